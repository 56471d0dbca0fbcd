"""`mendd eval --served` (policies/served_eval.py): records edited into the model as the home serves
it, and the figures read from its generated answers (tiny-llama: the mechanics, not the quality)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from daemon.config import load_config
from daemon.editor_jobs import run_served_eval
from decision_helpers import ACCEPT_ALL, ROUTED, make_decision_home
from test_cli import mendd

FIGURES = ("reliability", "generalization", "gen_prompt", "gen_rephrase", "nbhd_kept", "nbhd_leak", "repetition",
           "repetition_base")


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
