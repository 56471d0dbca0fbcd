"""git and DVC run under the home lock: each has a deadline, past which it is stopped and the
step fails with a StoreError (the service reports it and retries), instead of hanging for ever."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from store import dvcrepo, git as git_module
from store.errors import StoreError
from store_helpers import tool


def test_a_git_that_hangs_is_stopped_at_its_deadline_as_a_store_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tool(tmp_path, "git", "init", "-q")
    monkeypatch.setattr(git_module, "GIT_TIMEOUT_S", 1.0)
    started = time.monotonic()
    with pytest.raises(StoreError, match=r"did not finish in 1 s"):
        git_module.git(tmp_path, "-c", "alias.hang=!sleep 20", "hang")  # a git stuck on a lock or a dead mount
    assert time.monotonic() - started < 10


def test_a_dvc_push_past_its_deadline_is_stopped_as_a_store_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tool(tmp_path, "git", "init", "-q")
    dvcrepo.init(tmp_path)
    repo = dvcrepo.DvcRepo(tmp_path)
    repo.configure(str(tmp_path / "remote"))
    monkeypatch.setattr(dvcrepo, "PUSH_TIMEOUT_S", 0.05)  # less than DVC takes to start: the push is cut short
    with pytest.raises(StoreError, match=r"dvc push from .* did not finish"):
        repo.push()
    monkeypatch.setattr(dvcrepo, "PUSH_TIMEOUT_S", 120.0)
    repo.push()  # nothing to send, and nothing left locked by the push that was stopped
