"""The MLflow review UI for a home: `mlflow server` on 127.0.0.1 with light settings.

`mlflow server` serves from a uvicorn child, and neither outlives `mendd ui`: the server runs
under a small guard (this module run as a program) in a session of its own, which takes every
process it started down with it when it is told to stop, or when `mendd ui` dies, even by SIGKILL
(the kernel tells the guard: PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from daemon.config import MenddConfig
from daemon.home import Home

# One worker, no background job runner, no telemetry: the UI serves one reviewer on a small host.
UI_ENVIRONMENT = {
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
}
STOP_TIMEOUT_S = 10.0
# What a terminal closing (an ssh drop), Ctrl-C, Ctrl-\ or a stop sends: each ends the server.
STOP_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM)
_PR_SET_PDEATHSIG = 1


def ui_command(home: Home, config: MenddConfig, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", config.mlflow.tracking_uri,
            "--default-artifact-root", home.mlflow_artifacts.resolve().as_uri(),
            "--host", host, "--port", str(port), "--workers", "1"]


def ui_environment() -> dict[str, str]:
    return {**os.environ, **UI_ENVIRONMENT}


def start_server(command: list[str], **popen: Any) -> subprocess.Popen:
    """`command` under the guard, in a session of its own (so a terminal's signals reach only the
    caller, which stops it with :func:`stop_server`). Call it from the thread that lives as long as
    the server should: the guard is told when that thread ends."""
    guard = [sys.executable, "-m", "daemon.mlflow_ui", str(os.getpid()), *command]
    return subprocess.Popen(guard, env=ui_environment(), start_new_session=True, **popen)


def stop_server(server: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM to every process of the server's group; SIGKILL to any left after `timeout` seconds."""
    _stop_group(server.pid, lambda: _group_alive(server), timeout)
    server.wait()


def stop_on_signals() -> None:
    """Each of STOP_SIGNALS raises KeyboardInterrupt in the main thread, as Ctrl-C does: the
    caller's `finally` then stops the server."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.default_int_handler)


def _stop_group(pgid: int, alive, timeout: float) -> None:
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive():
        _signal_group(pgid, signal.SIGKILL)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(server: subprocess.Popen) -> bool:
    server.poll()  # reaped, the parent no longer counts as a member
    try:
        os.killpg(server.pid, 0)
    except ProcessLookupError:
        return False
    return True


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of a process group, from /proc."""
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


def _guard(parent: int, command: list[str]) -> int:
    """Run `command` in this process group until it exits or this process is told to stop; then
    stop the whole group (the uvicorn worker too), this process last."""
    stop_on_signals()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:  # it died before the request above could take effect
        return 0
    server = subprocess.Popen(command)
    try:
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        for sig in STOP_SIGNALS:  # the group's SIGTERM below reaches this process too
            signal.signal(sig, signal.SIG_IGN)
        me = os.getpid()
        _stop_group(os.getpgrp(), lambda: server.poll() is None or set(group_members(me)) - {me}, STOP_TIMEOUT_S)


if __name__ == "__main__":
    sys.exit(_guard(int(sys.argv[1]), sys.argv[2:]))
