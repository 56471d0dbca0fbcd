"""The MLflow review UI for a home: `mlflow server` on 127.0.0.1 with light settings."""
from __future__ import annotations

import os
import sys

from daemon.config import MenddConfig
from daemon.home import Home

# One worker, no background job runner, no telemetry: the UI serves one reviewer on a small host.
UI_ENVIRONMENT = {
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
}


def ui_command(home: Home, config: MenddConfig, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", config.mlflow.tracking_uri,
            "--default-artifact-root", home.mlflow_artifacts.resolve().as_uri(),
            "--host", host, "--port", str(port), "--workers", "1"]


def ui_environment() -> dict[str, str]:
    return {**os.environ, **UI_ENVIRONMENT}
