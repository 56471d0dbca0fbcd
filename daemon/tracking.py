"""MLflow at the edge: a sqlite backend inside the home, an explicit artifact location per experiment."""
from __future__ import annotations

import logging
import os
from pathlib import Path

TRAINING_EXPERIMENT = "mendd-editor-training"


def client(tracking_uri: str):
    """An MlflowClient for the home's backend; quiet about its own migrations and telemetry."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=tracking_uri)


def experiment_id(mlflow_client, name: str, artifact_root: Path) -> str:
    """The experiment's id, creating it with its artifacts under `artifact_root/name`."""
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = (artifact_root / name).resolve()
    location.mkdir(parents=True, exist_ok=True)
    return mlflow_client.create_experiment(name, artifact_location=location.as_uri())
