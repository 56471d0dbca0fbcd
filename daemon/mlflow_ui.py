"""The MLflow review UI for a home: `mlflow server` on 127.0.0.1 with light settings."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

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


STOP_TIMEOUT_S = 10.0


def start_server(command: list[str], **popen: Any) -> subprocess.Popen:
    """`mlflow server` in a session of its own. It serves from a uvicorn child, which outlives a
    parent that is killed alone: :func:`stop_server` stops the whole group."""
    return subprocess.Popen(command, env=ui_environment(), start_new_session=True, **popen)


def stop_server(server: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM to every process of the server's group; SIGKILL to any left after `timeout` seconds."""
    _signal_group(server, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _group_alive(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _group_alive(server):
        _signal_group(server, signal.SIGKILL)
    server.wait()


def _signal_group(server: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(server.pid, sig)
    except ProcessLookupError:
        pass


def _group_alive(server: subprocess.Popen) -> bool:
    server.poll()  # reaped, the parent no longer counts as a member
    try:
        os.killpg(server.pid, 0)
    except ProcessLookupError:
        return False
    return True
