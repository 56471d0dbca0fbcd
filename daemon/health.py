"""What is wrong right now, by component. The service degrades and clears; /healthz and
`mendd status` read it (the service also writes it to the home, for `status` to find).

It also watches the one worker: each job runs under :meth:`Health.job` with a bound on the time
between its signs of progress. A job past its bound, or no job at all for STALE_S (the tick runs
every few seconds), is the problem `worker`; the service then stops pinging systemd's watchdog, and
a reader of the file sees it go stale.
"""
from __future__ import annotations

import errno
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

STALE_S = 60.0  # an idle worker runs the tick every 5 s: this long without any job, it is stuck


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


@dataclass
class _Running:
    name: str
    bound_s: float
    since: float  # time.monotonic() of its start or its last progress


class Health:
    def __init__(self) -> None:
        self._problems: dict[str, str] = {}
        self._lock = threading.Lock()
        self._running: _Running | None = None
        self._idle_since: float | None = None  # None until the first job ends

    @contextmanager
    def job(self, name: str, bound_s: float) -> Iterator[None]:
        """The worker runs `name`, which shows progress at least every `bound_s` seconds."""
        with self._lock:
            self._running = _Running(name, bound_s, time.monotonic())
        try:
            yield
        finally:
            with self._lock:
                self._running, self._idle_since = None, time.monotonic()

    def progress(self) -> None:
        """The running job moved on (a cycle between two decisions): its bound starts again."""
        with self._lock:
            if self._running is not None:
                self._running.since = time.monotonic()

    def stuck(self) -> str | None:
        """Why the worker looks stuck, or None while it keeps within its bounds."""
        with self._lock:
            now, running, idle_since = time.monotonic(), self._running, self._idle_since
        if running is not None and now - running.since > running.bound_s:
            return (f"{running.name} has shown no progress for {now - running.since:.0f} s "
                    f"(its bound is {running.bound_s:.0f} s)")
        if running is None and idle_since is not None and now - idle_since > STALE_S:
            return f"no job has run for {now - idle_since:.0f} s"
        return None

    def _fresh_for_s(self) -> float:
        """How long the file just written stays current: the running job's bound, else STALE_S."""
        with self._lock:
            return self._running.bound_s if self._running is not None else STALE_S

    def degrade(self, component: str, reason: str) -> None:
        with self._lock:
            self._problems[component] = reason

    def clear(self, component: str) -> None:
        with self._lock:
            self._problems.pop(component, None)

    @property
    def ok(self) -> bool:
        return not self.problems()

    def problems(self) -> dict[str, str]:
        with self._lock:
            found = dict(self._problems)
        stuck = self.stuck()
        return {**found, "worker": stuck} if stuck else found

    def write(self, path: Path, extra: dict) -> None:
        """Atomically, so a reader never sees half a file. `fresh_for_s` tells a reader when the
        file has gone stale: the service writes it at least that often while its worker lives."""
        problems = self.problems()
        state = {"ok": not problems, "problems": problems, "pid": os.getpid(), "at": time.time(),
                 "fresh_for_s": self._fresh_for_s(), "updated_at": datetime.now(timezone.utc).isoformat(), **extra}
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
    age = time.time() - state.get("at", 0)
    if age > state.get("fresh_for_s", STALE_S):
        return {**state, "ok": False, "problems": {
            **state.get("problems", {}),
            "worker": f"the service has not written its health for {age:.0f} s (last {state.get('updated_at')}): it may be stuck"}}
    return state
