"""The real ``git`` command, run in the store; a failure becomes a StoreError with git's words."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from store.errors import StoreError


def _env() -> dict[str, str]:
    # Read-only commands (status) take no optional index lock, so a kill during one leaves no index.lock.
    return {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}


def git(root: Path, *args: str) -> str:
    """Run ``git args`` in ``root`` and return its stdout."""
    result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, env=_env())
    if result.returncode != 0:
        raise StoreError(f"git {' '.join(args)} failed in {root}: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def git_ok(root: Path, *args: str) -> bool:
    """Whether ``git args`` succeeds (for questions such as "does this ref exist?")."""
    return subprocess.run(["git", *args], cwd=root, capture_output=True, env=_env()).returncode == 0


def changed_paths(root: Path) -> list[str]:
    """Paths git sees as modified, staged or untracked (``git status --porcelain``)."""
    return [line[3:] for line in git(root, "status", "--porcelain", "--untracked-files=all").splitlines()]
