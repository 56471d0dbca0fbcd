"""Decisions end to end on tiny-llama: each has an MLflow run; accepted ones are committed, held ones
wait for a person (CLI or the run's tag in the UI), rejected ones change nothing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

from daemon import review, tracking
from daemon.cycle import decide, rejudge_on_head
from daemon.feeds import enqueue
from decision_helpers import ACCEPT_ALL, FACTS, HOLD_ALL, REJECT_ALL, make_decision_home, open_runtime
from test_cli import mendd


def decide_facts(home, facts=FACTS):
    rt = open_runtime(home)
    try:
        enqueue(rt.records.versions.ledger, facts, "test")
        return decide(rt, rt.records.versions.ledger.pending(10)), rt.served
    finally:
        rt.close()


def statuses(home) -> dict[str, tuple[str, str | None]]:
    rt = open_runtime(home)
    try:
        return {c.external_id: (c.status.value, c.version) for c in rt.records.versions.ledger.corrections()}
    finally:
        rt.close()


def test_an_accepted_decision_is_committed_with_its_run(tmp_path: Path, data_root) -> None:
    home = make_decision_home(tmp_path / "home", ACCEPT_ALL, data_root)
    result, served = decide_facts(home)
    assert result.decision.outcome == "accepted"
    assert served.tag == "v0001" and served.run_id == result.run_id
    rt = open_runtime(home)
    try:
        run = rt.records.mlflow.get_run(result.run_id)
        artifacts = {a.path for a in rt.records.mlflow.list_artifacts(result.run_id)}
    finally:
        rt.close()
    assert run.data.tags[tracking.DECISION_TAG] == "accepted"
    assert run.data.tags[tracking.VERSION_TAG] == "v0001"
    assert run.data.tags[tracking.GIT_SHA_TAG] == served.sha
    assert {"locality", "ppl_drawdown", "reliability", "edit_seconds", "gate_seconds"} <= set(run.data.metrics)
    assert {"corrections.jsonl", "examples.json", "decision.txt"} <= artifacts
    assert statuses(home) == {"c1": ("applied", "v0001"), "c2": ("applied", "v0001")}


def test_a_rejected_decision_changes_no_weights_and_says_why(tmp_path: Path, data_root) -> None:
    home = make_decision_home(tmp_path / "home", REJECT_ALL, data_root)
    result, served = decide_facts(home)
    assert result.decision.outcome == "rejected" and result.version is None
    assert served.tag == "v0000"
    rows = statuses(home)
    assert rows == {"c1": ("rejected", None), "c2": ("rejected", None)}
    rt = open_runtime(home)
    try:
        reason = rt.records.versions.ledger.correction("c1").reason
    finally:
        rt.close()
    assert reason.startswith("rejected: reliability")


def test_a_held_decision_is_approved_through_its_mlflow_tag_and_committed(tmp_path: Path, data_root) -> None:
    home = make_decision_home(tmp_path / "home", HOLD_ALL, data_root)
    result, _ = decide_facts(home)
    assert result.decision.outcome == "held"
    assert statuses(home)["c1"] == ("held", None)
    rt = open_runtime(home)
    try:
        assert [d.run_id for d in review.held(rt.records)] == [result.run_id]
        rt.records.mlflow.set_tag(result.run_id, tracking.REVIEW_TAG, "approve")  # what a reviewer does in the UI
        settled = review.settle_tagged(rt.records)
        assert review.held(rt.records) == []
        tags = rt.records.mlflow.get_run(result.run_id).data.tags
    finally:
        rt.close()
    [(run_id, action, version, _)] = settled
    assert (run_id, action, version.tag) == (result.run_id, "approved", "v0001")
    assert tags[tracking.SETTLED_TAG] == "approved" and tags[tracking.VERSION_TAG] == "v0001"
    assert statuses(home) == {"c1": ("applied", "v0001"), "c2": ("applied", "v0001")}
    assert not (home.held_dir / f"{result.run_id}.safetensors").exists()


def test_review_list_approve_and_reject_from_the_command_line(tmp_path: Path, data_root) -> None:
    home = make_decision_home(tmp_path / "home", HOLD_ALL, data_root)
    first, _ = decide_facts(home, FACTS[:1])
    second, _ = decide_facts(home, FACTS[1:])
    listed = mendd("--home", str(home.root), "review", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [d["run_id"] for d in json.loads(listed.stdout)] == [first.run_id, second.run_id]

    approved = mendd("--home", str(home.root), "review", "approve", first.run_id)
    assert approved.returncode == 0, approved.stderr
    assert "v0001: committed the held decision" in approved.stdout
    rejected = mendd("--home", str(home.root), "review", "reject", second.run_id)
    assert rejected.returncode == 0, rejected.stderr
    assert statuses(home) == {"c1": ("applied", "v0001"), "c2": ("rejected", None)}


def held_twice_then_first_approved(home):
    """Two decisions held on v0000, then the first approved: the second was judged on a head that moved."""
    first, _ = decide_facts(home, FACTS[:1])
    second, _ = decide_facts(home, FACTS[1:])
    rt = open_runtime(home)
    try:
        assert review.approve(rt.records, first.run_id, "test").tag == "v0001"
    finally:
        rt.close()
    return second.run_id


def test_a_decision_held_on_an_older_head_is_not_approved_without_being_judged_again(tmp_path: Path, data_root) -> None:
    home = make_decision_home(tmp_path / "home", HOLD_ALL, data_root)
    stale = held_twice_then_first_approved(home)
    rt = open_runtime(home)
    try:
        with pytest.raises(review.StaleReview, match="judged on v0000, but the head is now v0001"):
            review.approve(rt.records, stale, "test")
        assert rt.records.versions.store.head().tag == "v0001"
    finally:
        rt.close()
    assert statuses(home)["c2"] == ("held", None)


def test_approving_after_the_head_moved_commits_with_the_figures_judged_on_the_head(tmp_path: Path, data_root) -> None:
    home = make_decision_home(tmp_path / "home", HOLD_ALL, data_root)
    stale = held_twice_then_first_approved(home)
    rt = open_runtime(home)
    try:
        version = review.approve(rt.records, stale, "test", rejudge=rejudge_on_head(rt))
        run = rt.records.mlflow.get_run(stale)
    finally:
        rt.close()
    assert version.tag == "v0002"
    assert run.data.tags["mendd.rejudged_on"] == "v0001" and run.data.tags["mendd.rejudged"] == "held"
    assert version.figures["reliability"] == run.data.metrics["rejudged.reliability"]
    assert statuses(home)["c2"] == ("applied", "v0002")


def test_an_approval_tag_the_gate_rejects_on_the_moved_head_is_refused_with_a_note(tmp_path: Path, data_root) -> None:
    home = make_decision_home(tmp_path / "home", HOLD_ALL, data_root)
    stale = held_twice_then_first_approved(home)
    (home.root / "policy.yaml").write_text(REJECT_ALL)
    rt = open_runtime(home)
    try:
        rt.records.mlflow.set_tag(stale, tracking.REVIEW_TAG, "approve")
        settled = review.settle_tagged(rt.records, rejudge_on_head(rt))
        tags = rt.records.mlflow.get_run(stale).data.tags
        [waiting] = review.held(rt.records)
        head = rt.records.versions.store.head().tag
    finally:
        rt.close()
    assert [(s.run_id, s.action, s.version) for s in settled] == [(stale, "refused", None)]
    assert tracking.REVIEW_TAG not in tags and "rejected" in waiting.note
    assert head == "v0001" and statuses(home)["c2"] == ("held", None)


def test_approving_a_stale_decision_from_the_command_line_judges_it_on_the_head(tmp_path: Path, data_root) -> None:
    home = make_decision_home(tmp_path / "home", HOLD_ALL, data_root)
    stale = held_twice_then_first_approved(home)
    approved = mendd("--home", str(home.root), "review", "approve", stale)
    assert approved.returncode == 0, approved.stderr
    assert "v0002: committed the held decision" in approved.stdout
    assert statuses(home)["c2"] == ("applied", "v0002")


def test_approving_a_run_that_is_not_held_exits_2_and_changes_nothing(tmp_path: Path, data_root) -> None:
    home = make_decision_home(tmp_path / "home", HOLD_ALL, data_root)
    decide_facts(home, FACTS[:1])
    result = mendd("--home", str(home.root), "review", "approve", "0123456789abcdef")
    assert result.returncode == 2
    assert "is not a decision waiting for review" in result.stderr
    assert statuses(home)["c1"] == ("held", None)


def test_a_tracking_backend_that_is_down_commits_nothing_and_leaves_corrections_pending(
        tmp_path: Path, data_root, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    home = make_decision_home(tmp_path / "home", ACCEPT_ALL, data_root)
    rt = open_runtime(home)
    try:
        enqueue(rt.records.versions.ledger, FACTS, "test")
        rt.records.mlflow = tracking.client("http://127.0.0.1:9")  # nothing listens on the discard port
        with pytest.raises(MlflowException, match=r"http://127\.0\.0\.1:9/.*Connection refused"):
            decide(rt, rt.records.versions.ledger.pending(10))
        assert rt.records.versions.store.head().tag == "v0000"
    finally:
        rt.close()
    assert statuses(home) == {"c1": ("pending", None), "c2": ("pending", None)}


def test_an_approval_stopped_after_its_commit_is_finished_later_without_committing_twice(tmp_path: Path, data_root) -> None:
    home = make_decision_home(tmp_path / "home", HOLD_ALL, data_root)
    result, _ = decide_facts(home)
    rt = open_runtime(home)
    try:
        def tracking_down(*args, **kwargs):
            raise MlflowException("the tracking server went away")

        rt.records.mlflow.set_tag = tracking_down  # MLflow fails between the commit and the run's tags
        with pytest.raises(MlflowException):
            review.approve(rt.records, result.run_id, "test")
        del rt.records.mlflow.set_tag
        assert rt.records.versions.store.head().tag == "v0001"
        rt.records.mlflow.set_tag(result.run_id, tracking.REVIEW_TAG, "approve")  # still held: a person tags it
        [settled] = review.settle_tagged(rt.records)
        tags = rt.records.mlflow.get_run(result.run_id).data.tags
        tags_of_versions = [v.tag for v in rt.records.versions.store.versions()]
    finally:
        rt.close()
    assert (settled.action, settled.version.tag) == ("approved", "v0001")
    assert tags_of_versions == ["v0000", "v0001"]
    assert tags[tracking.SETTLED_TAG] == "approved" and tags[tracking.VERSION_TAG] == "v0001"
    assert statuses(home) == {"c1": ("applied", "v0001"), "c2": ("applied", "v0001")}
    assert not (home.held_dir / f"{result.run_id}.safetensors").exists()


def test_a_held_run_without_its_candidate_file_is_settled_unusable_and_the_tick_still_follows_a_checkout(
        tmp_path: Path, data_root) -> None:
    from daemon.config import load_config
    from daemon.service import Service
    from store_helpers import tool

    home = make_decision_home(tmp_path / "home", HOLD_ALL, data_root)
    first = held_twice_then_first_approved(home)  # v0001 committed; the other run waits
    (home.held_dir / f"{first}.safetensors").unlink()
    for command in (("git", "checkout", "v0000", "--", "model.dvc"), ("dvc", "checkout")):  # an operator's rollback
        assert tool(home.store_dir, *command).returncode == 0
    service = Service(home, load_config(home))
    service.rt = open_runtime(home)
    try:
        service.rt.records.mlflow.set_tag(first, tracking.REVIEW_TAG, "approve")
        service._tick()
        served, problems = service.rt.served, service.health.problems()
        tags = service.rt.records.mlflow.get_run(first).data.tags
        reason = service.rt.records.versions.ledger.correction("c2").reason
        waiting = review.held(service.rt.records)
    finally:
        service.rt.close()
    assert problems == {}
    assert (served.tag, served.restores) == ("v0002", "v0000")
    assert waiting == [] and tags[tracking.SETTLED_TAG] == "unusable"
    assert tags[tracking.REVIEW_NOTE_TAG] == reason == review.MISSING_CANDIDATE
    assert statuses(home)["c2"] == ("rejected", None)


def test_a_held_run_whose_corrections_were_decided_again_after_a_stop_is_settled_unusable_untagged(
        tmp_path: Path, data_root) -> None:
    from store.ledger_schema import CorrectionStatus

    home = make_decision_home(tmp_path / "home", HOLD_ALL, data_root)
    abandoned, _ = decide_facts(home)
    rt = open_runtime(home)
    try:
        ledger = rt.records.versions.ledger
        # as a stop between the held run and the ledger leaves it: the corrections still pending
        ledger.mark([row.key for row in ledger.corrections()], CorrectionStatus.pending)
        again = decide(rt, ledger.pending(10))
        settled = review.settle_tagged(rt.records)
        waiting = [d.run_id for d in review.held(rt.records)]
        tags = rt.records.mlflow.get_run(abandoned.run_id).data.tags
    finally:
        rt.close()
    assert [(s.run_id, s.action) for s in settled] == [(abandoned.run_id, "unusable")]
    assert waiting == [again.run_id] and tags[tracking.SETTLED_TAG] == "unusable"
    assert statuses(home) == {"c1": ("held", None), "c2": ("held", None)}
    assert not (home.held_dir / f"{abandoned.run_id}.safetensors").exists()


def test_an_approval_is_acted_on_between_cycles_while_a_backlog_is_decided(tmp_path: Path, data_root) -> None:
    from daemon.config import load_config
    from daemon.service import Service
    from editors.types import Correction

    home = make_decision_home(tmp_path / "home", HOLD_ALL, data_root)
    waiting, _ = decide_facts(home)
    service = Service(home, load_config(home))
    service.rt = open_runtime(home)
    try:
        service.rt.records.mlflow.set_tag(waiting.run_id, tracking.REVIEW_TAG, "approve")
        backlog = [Correction(f"b{i}", f"Fact {i}: the answer to question {i} is", f"word{i}") for i in range(2)]
        enqueue(service.rt.records.versions.ledger, backlog, "test")
        service._maybe_cycle()  # decides the whole backlog before it returns
        settled = service.rt.records.mlflow.get_run(waiting.run_id).data.tags.get(tracking.SETTLED_TAG)
    finally:
        service.rt.close()
    assert settled == "approved"
    assert statuses(home)["c1"] == ("applied", "v0001")


def test_a_held_batch_decided_again_in_parts_leaves_only_its_parts_waiting_for_review(tmp_path: Path, data_root) -> None:
    from daemon.cycle import run_cycle

    home = make_decision_home(tmp_path / "home", HOLD_ALL, data_root)
    home.config_path.write_text(home.config_path.read_text().replace("batch_size: 1", "batch_size: 2"))
    rt = open_runtime(home)
    try:
        enqueue(rt.records.versions.ledger, FACTS, "test")
        report = run_cycle(rt)
        waiting = {d.run_id for d in review.held(rt.records)}
        batch_run = report.steps[0].run_id
        batch_tags = rt.records.mlflow.get_run(batch_run).data.tags
    finally:
        rt.close()
    assert len(report.steps) == 3 and waiting == {s.run_id for s in report.steps[1:]}
    assert batch_tags[tracking.SETTLED_TAG] == "split"
