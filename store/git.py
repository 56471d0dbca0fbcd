"""The real ``git`` command, run in the store; a failure becomes a StoreError with git's words."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from store.errors import StoreError

# A git that hangs (a stuck NFS mount, a lock it waits on) must not hold the home lock for ever;
# a commit of a large model's pointer files takes seconds, so this is only ever reached when stuck.
GIT_TIMEOUT_S = 600.0


def _env() -> dict[str, str]:
    # Read-only commands (status) take no optional index lock, so a kill during one leaves no index.lock.
    return {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}


def _run(root: Path, args: tuple[str, ...], **options) -> subprocess.CompletedProcess:
    """git, killed after GIT_TIMEOUT_S (a commit's recovery removes any lock file it leaves)."""
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, env=_env(), timeout=GIT_TIMEOUT_S, **options)
    except subprocess.TimeoutExpired:
        raise StoreError(f"git {' '.join(args)} did not finish in {GIT_TIMEOUT_S:.0f} s in {root}; it was stopped") from None


def git(root: Path, *args: str) -> str:
    """Run ``git args`` in ``root`` and return its stdout."""
    result = _run(root, args, text=True)
    if result.returncode != 0:
        raise StoreError(f"git {' '.join(args)} failed in {root}: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def git_ok(root: Path, *args: str) -> bool:
    """Whether ``git args`` succeeds (for questions such as "does this ref exist?")."""
    return _run(root, args).returncode == 0


def changed_paths(root: Path) -> list[str]:
    """Paths git sees as modified, staged or untracked (``git status --porcelain``)."""
    return [line[3:] for line in git(root, "status", "--porcelain", "--untracked-files=all").splitlines()]
