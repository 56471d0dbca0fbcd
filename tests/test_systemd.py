"""sd_notify: messages reach the socket; a listener that stops reading never stalls the service."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from daemon import systemd


def test_notify_is_a_no_op_without_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False


def test_notify_never_blocks_on_a_listener_that_does_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    try:
        assert systemd.notify("READY=1") is True
        assert listener.recv(64) == b"READY=1"
        started = time.monotonic()
        sent = [systemd.notify("WATCHDOG=1") for _ in range(5000)]  # far more than the queue holds
        assert time.monotonic() - started < 10
        assert True in sent and False in sent  # the queue filled up, and the calls returned anyway
    finally:
        listener.close()


def test_watchdog_interval_is_half_of_watchdog_usec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert systemd.watchdog_interval() == 10.0
    monkeypatch.delenv("WATCHDOG_USEC")
    assert systemd.watchdog_interval() is None


def unit_settings(name: str) -> dict[str, list[str]]:
    """A unit file's `Key=value` lines, each key with its values in order."""
    settings: dict[str, list[str]] = {}
    for text in (Path(__file__).parents[1] / "deploy" / name).read_text().splitlines():
        if "=" in text and not text.startswith("#"):
            key, value = text.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


@pytest.mark.parametrize("unit", ["mendd.service", "mlflow-ui.service"])
def test_each_unit_bounds_memory_and_tasks_and_does_not_restart_on_a_configuration_error(unit: str) -> None:
    settings = unit_settings(unit)
    for key in ("MemoryHigh", "MemoryMax", "TasksMax"):
        assert key in settings, f"{unit} has no {key}="
    assert settings["RestartPreventExitStatus"] == ["2"]  # mendd's exit code for a configuration error
    assert settings["Restart"] == ["on-failure"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_units_verify_clean() -> None:
    checked = subprocess.run(["bash", str(Path(__file__).parents[1] / "deploy" / "check-units.sh")],
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
