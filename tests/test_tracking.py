"""Decision runs in MLflow: what the review reads back from a real MLflow backend."""
from __future__ import annotations

from pathlib import Path

from daemon import tracking


def test_every_unsettled_held_run_is_listed_however_many_settled_ones_came_before(tmp_path: Path) -> None:
    mlflow = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = tracking.experiment_id(mlflow, "decisions", tmp_path / "artifacts")
    held = {tracking.DECISION_TAG: "held"}
    for start in range(7):  # older held decisions, settled since: they keep their held tag
        mlflow.create_run(experiment, start_time=1000 + start, tags={**held, tracking.SETTLED_TAG: "approved"})
    waiting = [mlflow.create_run(experiment, start_time=2000 + start, tags=held).info.run_id for start in range(3)]
    mlflow.create_run(experiment, start_time=3000, tags={tracking.DECISION_TAG: "accepted"})
    listed = tracking.held_runs(mlflow, experiment, page_size=2)
    assert [run.info.run_id for run in listed] == waiting
