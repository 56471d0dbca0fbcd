"""One maintenance cycle on tiny-llama: oldest pending first, contradictions superseded, rejected
batches bisected down to single corrections."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from daemon.cycle import run_cycle, split
from daemon.feeds import enqueue
from decision_helpers import ACCEPT_ALL, HOLD_ALL, REJECT_ALL, make_decision_home, open_runtime
from editors.types import Correction
from store.ledger import LedgerCorrection
from store.ledger_schema import CorrectionStatus
from test_cli import mendd

FOUR = [Correction(f"c{i}", f"Fact number {i} is about", f"thing {i}") for i in range(4)]


def batched(home, size: int = 10):
    home.config_path.write_text(home.config_path.read_text().replace("batch_size: 1\n", f"batch_size: {size}\n"))
    return home


def test_contradicting_corrections_keep_the_newest(tmp_path: Path, data_root) -> None:
    home = batched(make_decision_home(tmp_path / "home", ACCEPT_ALL, data_root))
    rt = open_runtime(home)
    try:
        ledger = rt.records.versions.ledger
        enqueue(ledger, [Correction("old", "The capital of France is", "Lyon")], "t")
        enqueue(ledger, [Correction("new", "The capital of  france is", "Marseille")], "t")
        report = run_cycle(rt)
        rows = {row.external_id: row for row in ledger.corrections()}
    finally:
        rt.close()
    assert report.superseded == ["old"]
    assert rows["old"].status.value == "superseded" and "superseded by new" in rows["old"].reason
    assert rows["new"].status.value == "applied"


def test_a_rejected_batch_is_split_in_halves_down_to_single_corrections(tmp_path: Path, data_root) -> None:
    home = batched(make_decision_home(tmp_path / "home", REJECT_ALL, data_root))
    rt = open_runtime(home)
    try:
        enqueue(rt.records.versions.ledger, FOUR, "t")
        report = run_cycle(rt)
        rows = rt.records.versions.ledger.corrections()
        cycle = rt.records.versions.ledger.cycles()[-1]
    finally:
        rt.close()
    assert [len(step.edited) for step in report.steps] == [4, 2, 1, 1, 2, 1, 1]
    assert {row.status.value for row in rows} == {"rejected"}
    assert len({row.run_id for row in rows}) == 4  # each rejected on its own run, as a single
    assert len(cycle.run_ids) == 7 and cycle.outcome == "rejected"


def test_a_held_batch_is_split_too_and_only_single_corrections_are_held_for_review(tmp_path: Path, data_root) -> None:
    home = batched(make_decision_home(tmp_path / "home", HOLD_ALL, data_root))
    rt = open_runtime(home)
    try:
        enqueue(rt.records.versions.ledger, FOUR[:2], "t")
        report = run_cycle(rt)
        rows = rt.records.versions.ledger.corrections()
    finally:
        rt.close()
    assert [len(step.edited) for step in report.steps] == [2, 1, 1]
    assert {row.status.value for row in rows} == {"held"}
    assert len({row.run_id for row in rows}) == 2  # each held on its own run: a reviewer decides one at a time
    assert len(list(home.held_dir.glob("*.safetensors"))) == 2


def test_the_batch_size_caps_a_cycle_and_the_oldest_go_first(tmp_path: Path, data_root) -> None:
    home = batched(make_decision_home(tmp_path / "home", ACCEPT_ALL, data_root), 3)
    rt = open_runtime(home)
    try:
        enqueue(rt.records.versions.ledger, FOUR, "t")
        report = run_cycle(rt)
        pending = [row.external_id for row in rt.records.versions.ledger.pending(10)]
    finally:
        rt.close()
    assert report.steps[0].edited == ["c0", "c1", "c2"] and pending == ["c3"]


def test_status_reports_the_version_counts_and_last_cycle(tmp_path: Path, data_root) -> None:
    home = batched(make_decision_home(tmp_path / "home", ACCEPT_ALL, data_root))
    feed = tmp_path / "c.jsonl"
    feed.write_text("".join(json.dumps({"id": c.id, "prompt": c.prompt, "target_new": c.target_new}) + "\n" for c in FOUR[:2]) + "bad\n")
    submitted = mendd("--home", str(home.root), "submit", str(feed), "--json")
    assert submitted.returncode == 0, submitted.stderr
    assert json.loads(submitted.stdout)["received"] == 2
    cycled = mendd("--home", str(home.root), "cycle", "--json", timeout=300)
    assert cycled.returncode == 0, cycled.stderr
    assert json.loads(cycled.stdout)["version"] == "v0001"
    status = json.loads(mendd("--home", str(home.root), "status", "--json").stdout)
    assert status["version"] == "v0001"
    assert status["corrections"]["applied"] == 2 and status["corrections"]["quarantined"] == 1
    assert status["last_cycle"]["outcome"] == "accepted"
    assert status["health"]["ok"] is False  # no service is running


def _rows(n: int) -> list[LedgerCorrection]:
    now = datetime.now(timezone.utc)
    return [LedgerCorrection(i, "t", f"c{i}", {}, CorrectionStatus.pending, None, None, None, now) for i in range(n)]


def test_a_batch_whose_culprits_the_gate_named_is_split_into_them_and_the_rest() -> None:
    parts = split(_rows(10), frozenset({"c3", "c7"}))
    assert [[row.external_id for row in part] for part in parts] == [["c3", "c7"], [f"c{i}" for i in range(10) if i not in (3, 7)]]


def test_a_batch_the_gate_blamed_as_a_whole_or_entirely_is_split_in_halves() -> None:
    for suspects in (frozenset(), frozenset(f"c{i}" for i in range(4))):
        assert [len(part) for part in split(_rows(4), suspects)] == [2, 2]
