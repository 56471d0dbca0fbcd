"""The `mlflow server` behind `mendd ui` (and the fault scenarios) stops with every process it started."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from daemon.home import Home
from daemon.mlflow_ui import stop_server
from service_harness import free_port, start_mlflow_server


def group_members(pgid: int) -> list[int]:
    """The live processes of a process group, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        state, _ppid, group = stat[stat.rindex(")") + 2:].split()[:3]
        if int(group) == pgid and state != "Z":
            members.append(int(entry.name))
    return members


def test_stopping_the_mlflow_server_leaves_no_process_of_its_group(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    home.mlflow_artifacts.mkdir(parents=True)
    home.config_path.write_text("")
    server = start_mlflow_server(home, free_port())
    try:
        assert len(group_members(server.pid)) >= 2  # `mlflow server` and the uvicorn worker that serves
        stop_server(server)
        with pytest.raises(ProcessLookupError):
            os.killpg(server.pid, 0)
    finally:
        if group_members(server.pid):
            os.killpg(server.pid, signal.SIGKILL)
