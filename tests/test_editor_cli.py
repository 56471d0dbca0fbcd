"""`mendd train-editor` and `mendd eval` end to end on the tiny model, with a real MLflow backend."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def mendd(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture()
def data_env(data_root: Path) -> dict:
    return {"MENDD_DATA": str(data_root)}


def test_train_editor_writes_a_resumable_editor_and_logs_the_run_to_mlflow(tiny_home: Path, data_root: Path, data_env: dict) -> None:
    out = tiny_home / "editor.safetensors"
    val = data_root / "counterfact" / "val.json"
    args = ["--home", str(tiny_home), "train-editor", "--data", str(val), "--val", str(val), "--val-size", "3",
            "--val-every", "2", "--out", str(out), "--rank", "8", "--edits-per-step", "2"]
    first = mendd(*args, "--steps", "2", env=data_env)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["steps"] == 2 and out.exists()
    again = mendd(*args, "--steps", "4", env=data_env)
    assert json.loads(again.stdout)["steps"] == 4

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tiny_home / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mendd-editor-training")
    [run] = client.search_runs([experiment.experiment_id])  # the resumed run continues the same MLflow run
    assert run.data.params["c_loc"] == "1.0" and run.data.params["model"] == "tiny-llama"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "edit")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_reliability")] == [2, 4]


def test_eval_prints_every_metric_as_json(tiny_home: Path, data_root: Path, data_env: dict) -> None:
    result = mendd("--home", str(tiny_home), "eval", "--data", str(data_root / "counterfact" / "val.json"),
                   "--limit", "3", "--editor", "ft", "--json", env=data_env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["n"] == 3 and report["editor"] == "ft+projection"  # the home's default: editor.projection
    for key in ("reliability", "generalization", "neighborhood", "locality", "cf_success"):
        assert 0 <= report[key] <= 1, key
    assert report["edit_seconds_median"] > 0
    # A relative perplexity change: never below -1 (perplexity stays positive), and three fine-tuning
    # edits of the tiny model do not multiply it; NaN (an empty or broken measurement) fails both.
    assert -1 < report["ppl_drawdown"] < 1, report["ppl_drawdown"]


def test_eval_without_a_trained_editor_says_how_to_get_one(tiny_home: Path, data_root: Path, data_env: dict) -> None:
    result = mendd("--home", str(tiny_home), "eval", "--data", str(data_root / "counterfact" / "val.json"),
                   "--limit", "1", env=data_env)
    assert result.returncode == 2
    assert "train-editor" in result.stderr and "Traceback" not in result.stderr


def test_eval_refuses_a_least_squares_strength_that_is_not_positive(tiny_home: Path, data_root: Path, data_env: dict) -> None:
    result = mendd("--home", str(tiny_home), "eval", "--data", str(data_root / "counterfact" / "val.json"),
                   "--aggregation", "least_squares", "--aggregation-strength", "0", env=data_env)
    assert result.returncode == 2
    assert "--aggregation-strength" in result.stderr and "Traceback" not in result.stderr
