"""The `mlflow server` behind `mendd ui` (and the fault scenarios) stops with every process it started,
and with `mendd ui` however that ends."""
from __future__ import annotations

import os
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest

from daemon.home import Home
from daemon.mlflow_ui import group_members, stop_server
from service_harness import MENDD, free_port, start_mlflow_server, wait_for


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


def children(pid: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p) == pid]


def _parent(entry: Path) -> int | None:
    try:
        stat = (entry / "stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP], ids=["kill-9", "sighup"])
def test_the_server_ends_with_mendd_ui_killed_or_hung_up(tmp_path: Path, sig: signal.Signals) -> None:
    home = Home(tmp_path / "home")
    home.mlflow_artifacts.mkdir(parents=True)
    home.config_path.write_text("")
    port = free_port()
    ui = subprocess.Popen([MENDD, "--home", str(home.root), "ui", "--port", str(port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    group = None
    try:
        wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200, 120,
                 "the MLflow server", ui)
        [group] = children(ui.pid)  # the guard, leader of the server's group
        assert len(group_members(group)) >= 3  # the guard, `mlflow server` and its uvicorn worker
        ui.send_signal(sig)  # kill -9 of `mendd ui`, or its terminal gone (an ssh drop)
        ui.wait(timeout=30)
        wait_for(lambda: group_members(group) == [], 30, "every process of the server's group to end")
    finally:
        if ui.poll() is None:
            ui.kill()
        if group is not None and group_members(group):
            os.killpg(group, signal.SIGKILL)
