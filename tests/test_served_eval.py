"""`mendd eval --served` (policies/served_eval.py): records edited into the model as the home serves
it, and the figures read from its generated answers (tiny-llama: the mechanics, not the quality)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from rich.console import Console

from daemon.config import load_config
from daemon.editor_jobs import run_served_eval
from decision_helpers import ACCEPT_ALL, ROUTED, make_decision_home
from editors import routing
from editors.routing import Entry, Memory
from editors.types import Correction, LowRankUpdate
from policies.served_eval import Served, other_questions_for, read_served
from test_cli import mendd

FIGURES = ("reliability", "generalization", "gen_prompt", "gen_rephrase", "nbhd_kept", "nbhd_leak", "other_leak",
           "other_changed", "repetition", "repetition_base")
NEWTON = Correction("newton", "Isaac Newton was born in", "Rome", subject="Isaac Newton")


@pytest.mark.parametrize(("editor", "memory"), [(ROUTED, "routed"), ({}, "weights")])
def test_every_record_is_edited_into_the_served_model_and_its_answers_are_read(tmp_path: Path, data_root: Path,
                                                                             editor: dict, memory: str) -> None:
    home = make_decision_home(tmp_path / "home", ACCEPT_ALL, data_root, editor)
    report = run_served_eval(home, load_config(home), data_root / "counterfact" / "val.json", 3, 1, True, 4,
                             Console(quiet=True))
    assert report.memory == memory and report.subject and report.n == 3
    for key in FIGURES:
        assert 0 <= getattr(report, key) <= 1, key
    # tiny-llama's answers are runs of one character: no word pairs, so no entropy to compare with
    assert report.fluency is None
    assert report.chat_success is None  # CounterFact has no questions, tiny-llama no chat template
    assert {s["prompt"] for s in report.samples if "prompt" in s} <= {
        json.loads((data_root / "counterfact" / "val.json").read_text())[i]["prompt"] for i in range(3)}


def test_eval_served_without_subjects_prints_json_from_the_command_line(tmp_path: Path, data_root: Path) -> None:
    home = make_decision_home(tmp_path / "home", ACCEPT_ALL, data_root, ROUTED)
    result = mendd("--home", str(home.root), "eval", "--data", str(data_root / "counterfact" / "val.json"),
                   "--limit", "2", "--served", "--no-subject", "--tokens", "3", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["memory"], report["subject"], report["n"]) == ("routed", False, 2)
    assert all(len(s["served"]) > 0 for s in report["samples"])


def test_eval_served_refuses_options_that_would_measure_another_editor(tmp_path: Path, data_root: Path) -> None:
    home = make_decision_home(tmp_path / "home", ACCEPT_ALL, data_root, ROUTED)
    result = mendd("--home", str(home.root), "eval", "--data", str(data_root / "counterfact" / "val.json"),
                   "--served", "--editor", "ft")
    assert result.returncode == 2 and "--served" in result.stderr and "Traceback" not in result.stderr


def test_other_questions_are_asked_about_the_subjects_even_when_the_subject_field_is_dropped(
        tmp_path: Path, data_root: Path) -> None:
    home = make_decision_home(tmp_path / "home", ACCEPT_ALL, data_root, ROUTED)
    report = run_served_eval(home, load_config(home), data_root / "counterfact" / "val.json", 2, 1, False, 3,
                             Console(quiet=True))
    assert not report.subject and report.other_leak is not None and report.other_changed is not None
    subjects = [r["subject"] for r in json.loads((data_root / "counterfact" / "val.json").read_text())[:2]]
    assert all(any(s in row["other"] for s in subjects) for row in report.samples if "other" in row)


def serving_every_query(tiny) -> Memory:
    """A routed memory whose one entry (a random update) serves every query: τ and its floor at -1."""
    torch.manual_seed(3)
    update = {e.name: LowRankUpdate(3 * torch.randn(2, e.in_features), 3 * torch.randn(2, e.out_features), 0.5)
              for e in tiny.anatomy.editable}
    ref = routing.reference(tiny, ["Hello there my friend", "What is the time now"], 1)
    return Memory(1, -1.0, ref.centre, (Entry("newton", ref.centre + 1, -1.0, update),))


def test_a_memory_that_answers_other_questions_about_the_subject_with_the_correction_leaks(tiny) -> None:
    served = Served(tiny, serving_every_query(tiny))
    questions = other_questions_for([NEWTON])
    # the correction's target: what the memory answers the first other question (tiny-llama says no words)
    said = served.say([q.text for q in questions], 6)[0]
    report = read_served(served, [replace(NEWTON, target_new=said)], True, tokens=6)
    assert report.other_leak > 0 and report.other_changed == 1.0
    assert {"other": questions[0].text, "target": said, "served": said, "leak": True}.items() <= next(
        row for row in report.samples if row.get("other") == questions[0].text).items()


def test_a_model_that_answers_other_questions_as_the_base_model_neither_leaks_nor_changes(tiny) -> None:
    report = read_served(Served(tiny), [NEWTON], True, tokens=6)
    assert (report.other_leak, report.other_changed) == (0.0, 0.0)
