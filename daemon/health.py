"""What is wrong right now, by component. The service degrades and clears; /healthz and
`mendd status` read it (the service also writes it to the home, for `status` to find)."""
from __future__ import annotations

import errno
import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path


_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# How git ("Out of diskspace"), the OS (ENOSPC, EDQUOT) and SQLite ("database or disk is full") word it.
_DISK_FULL_WORDS = ("no space left", "out of diskspace", "disk quota", "disk is full")


def describe_failure(error: BaseException) -> str:
    """A failed job's reason for health: its type and message, led by "disk full: " when that is the
    cause, so an operator sees one phrase whichever step (git, DVC, a write of mendd's own) ran out."""
    detail = f"{type(error).__name__}: {error}"
    return f"disk full: {detail}" if _is_disk_full(error) else detail


def _is_disk_full(error: BaseException | None) -> bool:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:  # along the chain: a StoreError wraps DVC's OSError
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
            return True
        if any(words in str(error).lower() for words in _DISK_FULL_WORDS):
            return True
        error = error.__cause__ or error.__context__
    return False


class Health:
    def __init__(self) -> None:
        self._problems: dict[str, str] = {}
        self._lock = threading.Lock()

    def degrade(self, component: str, reason: str) -> None:
        with self._lock:
            self._problems[component] = reason

    def clear(self, component: str) -> None:
        with self._lock:
            self._problems.pop(component, None)

    @property
    def ok(self) -> bool:
        with self._lock:
            return not self._problems

    def problems(self) -> dict[str, str]:
        with self._lock:
            return dict(self._problems)

    def write(self, path: Path, extra: dict) -> None:
        """Atomically, so a reader never sees half a file."""
        state = {"ok": self.ok, "problems": self.problems(), "pid": os.getpid(),
                 "updated_at": datetime.now(timezone.utc).isoformat(), **extra}
        partial = path.with_suffix(".tmp")
        partial.write_text(json.dumps(state), encoding="utf-8")
        partial.replace(path)


def read_health(path: Path) -> dict:
    """The service's last written health, or why there is none."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {"ok": False, "problems": {"service": "not running (no health file)"}}
    try:
        os.kill(state["pid"], 0)
    except (ProcessLookupError, KeyError):
        return {**state, "ok": False, "problems": {"service": f"not running (last seen {state.get('updated_at')})"}}
    except PermissionError:
        pass  # alive, owned by another user (the service account)
    return state
