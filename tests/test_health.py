"""Health names a full disk in one recognisable way, whichever step ran out of room."""
from __future__ import annotations

import errno
import json
import os
import sqlite3
import time
from pathlib import Path

import pytest

from daemon.health import describe_failure
from store.errors import StoreError


def enospc() -> OSError:
    """The OS's own ENOSPC: /dev/full refuses every write with it."""
    with pytest.raises(OSError) as caught:
        with open("/dev/full", "wb") as full:
            full.write(b"x")
    return caught.value


def test_git_running_out_of_diskspace_is_a_full_disk() -> None:
    error = StoreError("git commit -q -F - failed in /srv/mendd/store: "
                       "error: index.lock write error. Out of diskspace\nfatal: cannot store index")
    assert describe_failure(error) == f"disk full: StoreError: {error}"


def test_an_oserror_enospc_is_a_full_disk() -> None:
    error = enospc()
    assert error.errno == errno.ENOSPC
    assert describe_failure(error) == f"disk full: OSError: {error}"


def test_a_store_error_caused_by_enospc_is_a_full_disk() -> None:
    error = StoreError("DVC failed in /srv/mendd/store: could not add model")
    error.__cause__ = enospc()  # as `raise ... from` sets it; the wrapper's own words need not say why
    assert describe_failure(error).startswith("disk full: StoreError: DVC failed")


def test_an_exceeded_disk_quota_is_a_full_disk() -> None:
    error = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/srv/mendd/store/model/x.safetensors")
    assert describe_failure(error).startswith("disk full: OSError:")


def test_sqlite_finding_its_disk_full_is_a_full_disk() -> None:
    error = sqlite3.OperationalError("database or disk is full")
    assert describe_failure(error) == "disk full: OperationalError: database or disk is full"


def test_any_other_failure_is_its_type_and_message() -> None:
    error = StoreError("git tag v0002 failed in /srv/mendd/store: fatal: tag 'v0002' already exists")
    assert describe_failure(error) == f"StoreError: {error}"


def test_a_job_past_its_bound_is_a_worker_problem_until_it_shows_progress() -> None:
    from daemon.health import Health

    health = Health()
    with health.job("tick", bound_s=0.2):
        assert health.problems() == {} and health.stuck() is None
        time.sleep(0.3)
        assert "tick has shown no progress" in health.problems()["worker"] and not health.ok
        health.progress()  # a cycle between two decisions
        assert health.problems() == {}
    assert health.ok


def test_an_idle_worker_is_stuck_once_no_job_ran_for_stale_s(monkeypatch: pytest.MonkeyPatch) -> None:
    from daemon import health as health_module

    monkeypatch.setattr(health_module, "STALE_S", 0.2)
    health = health_module.Health()
    assert health.stuck() is None  # before the first job: starting up
    with health.job("tick", bound_s=10):
        pass
    time.sleep(0.3)
    assert health.stuck().startswith("no job has run for")


def test_a_health_file_not_written_for_longer_than_it_promised_is_reported_stale(tmp_path: Path) -> None:
    from daemon.health import Health, read_health

    path = tmp_path / "health.json"
    health = Health()
    with health.job("cycle", bound_s=100):
        health.write(path, {"serving": "v0001"})  # a cycle's decision may take 100 s: fresh for that long
    assert read_health(path)["ok"] is True
    state = json.loads(path.read_text())
    path.write_text(json.dumps({**state, "at": time.time() - 99}))
    assert read_health(path)["ok"] is True
    path.write_text(json.dumps({**state, "at": time.time() - 101}))
    stale = read_health(path)
    assert stale["ok"] is False and "has not written its health for 101 s" in stale["problems"]["worker"]
    health.write(path, {})  # idle now: the tick's 5 s rhythm, so STALE_S
    path.write_text(json.dumps({**json.loads(path.read_text()), "at": time.time() - 61}))
    assert "worker" in read_health(path)["problems"]
