"""Crash safety: a real child process is killed with SIGKILL at each step of a commit; recovery at
the next start must leave the store at the old or the new version, `dvc status` clean, and the
ledger agreeing with the store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import load_config
from daemon.home import Home
from daemon.versioning import changing
from store.crash import COMMIT_POINTS, CRASH_ENV, DVC_ADDED, ROLLBACK_CHECKED_OUT, TENSORS_WRITTEN
from store.ledger_schema import CorrectionStatus
from store_helpers import FACTS, digests, make_home, mend_delta, open_home, store_is_clean, tool
from test_cli import mendd

CHILD = Path(__file__).with_name("crash_child.py")
# Before the git commit exists the commit is undone; from then on it is finished.
UNDONE = {TENSORS_WRITTEN, DVC_ADDED}


def run_child(home: Home, action: str, crash_at: str | None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, CRASH_ENV: crash_at} if crash_at else dict(os.environ)
    return subprocess.run([sys.executable, str(CHILD), str(home.root), action],
                          capture_output=True, text=True, env=env, timeout=600)


def killed_home(tmp_path: Path, action: str, point: str) -> Home:
    """A new home whose child was killed at `point` of `action`."""
    home = make_home(tmp_path / "home")
    killed = run_child(home, action, point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    return home


@pytest.fixture(scope="module")
def model_digests(tmp_path_factory) -> dict[str, dict[str, str]]:
    """The files of v0000 and of v0001 (c1 applied), from a child that was not killed."""
    home = make_home(tmp_path_factory.mktemp("reference") / "home")
    base = digests(home.store_dir / "model")
    finished = run_child(home, "edit", None)
    assert finished.returncode == 0, finished.stderr
    return {"v0000": base, "v0001": digests(home.store_dir / "model")}


def assert_consistent(home: Home, model_digests: dict[str, dict[str, str]]) -> str:
    """One whole version in the store, clean by the real `dvc status` and `git status`, and the
    ledger agreeing with it; returns the head tag."""
    versions = open_home(home)
    try:
        history = [v.tag for v in versions.store.versions()]
        head = history[-1]
        assert store_is_clean(home.store_dir)
        assert tool(home.store_dir, "git", "tag").stdout.split() == history
        assert versions.ledger.recorded_tags() == history
        served = "v0000" if head == "v0000" or versions.store.head().restores == "v0000" else "v0001"
        assert digests(home.store_dir / "model") == model_digests[served]
        c1 = versions.ledger.correction("c1")
        carried = served == "v0001"
        assert c1.status == (CorrectionStatus.applied if carried else
                             CorrectionStatus.rolled_back if "v0001" in history else CorrectionStatus.pending)
        return head
    finally:
        versions.close()


@pytest.mark.parametrize("point", COMMIT_POINTS)
def test_a_commit_killed_at_any_step_recovers_to_the_old_or_the_new_version(
        tmp_path: Path, point: str, model_digests) -> None:
    home = killed_home(tmp_path, "edit", point)
    with changing(home, load_config(home)) as (_versions, recovery):
        assert recovery.action == ("undone" if point in UNDONE else "none" if point == "before-ledger" else "completed")
    head = assert_consistent(home, model_digests)
    assert head == ("v0000" if point in UNDONE else "v0001")


@pytest.mark.parametrize("point", COMMIT_POINTS)
def test_a_routed_commit_killed_at_any_step_leaves_the_memory_of_the_old_or_the_new_version(
        tmp_path: Path, point: str, model_digests) -> None:
    home = killed_home(tmp_path, "routed", point)
    with changing(home, load_config(home)) as (versions, _recovery):
        head = versions.store.head().tag
        chunks = [name for name, _ in versions.store.memory_chunks()]
    assert store_is_clean(home.store_dir)
    assert (head, chunks) == (("v0000", []) if point in UNDONE else ("v0001", ["v0001"]))
    assert digests(home.store_dir / "model") == model_digests["v0000"]  # weight files never change


def test_a_rollback_killed_between_checkout_and_commit_is_undone(tmp_path: Path, model_digests) -> None:
    home = make_home(tmp_path / "home")
    assert run_child(home, "edit", None).returncode == 0
    killed = run_child(home, "rollback", ROLLBACK_CHECKED_OUT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    with changing(home, load_config(home)) as (_versions, recovery):
        assert recovery.action == "undone"
    assert assert_consistent(home, model_digests) == "v0001"


def test_after_recovery_the_store_takes_new_commits(tmp_path: Path, model_digests) -> None:
    from daemon.commits import commit_delta

    home = make_home(tmp_path / "home")
    assert run_child(home, "edit", DVC_ADDED).returncode == -signal.SIGKILL
    with changing(home, load_config(home)) as (versions, _recovery):
        made = commit_delta(versions, mend_delta(FACTS[:1]), run_id="again", figures={})
    assert made.tag == "v0001"
    assert assert_consistent(home, model_digests) == "v0001"


def test_the_cli_recovers_at_start_and_says_so(tmp_path: Path, model_digests) -> None:
    home = make_home(tmp_path / "home")
    assert run_child(home, "edit", "git-committed").returncode == -signal.SIGKILL
    result = mendd("--home", str(home.root), "rollback", "v0000")
    assert result.returncode == 0, result.stderr
    assert "interrupted commit of v0001 was completed" in result.stderr
    assert "v0002: serving the model of v0000 again" in result.stdout
    assert assert_consistent(home, model_digests) == "v0002"


def test_a_dvc_lock_file_torn_by_a_kill_does_not_stop_the_store(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    torn = home.store_dir / ".dvc" / "tmp" / "rwlock"
    torn.parent.mkdir(parents=True, exist_ok=True)
    torn.write_text('{"read": {"model": [{"pid": 12')  # a DVC process killed mid-write
    versions = open_home(home)
    try:
        assert versions.store.workspace().state == "clean"
    finally:
        versions.close()
    assert store_is_clean(home.store_dir)
