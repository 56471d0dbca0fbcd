"""The home lock: the one lock a process holds while it changes a home's store or ledger."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from filelock import FileLock, Timeout

from daemon.home import Home
from store.errors import StoreError


LOCK_TIMEOUT_S = 60.0


@contextmanager
def home_lock(home: Home) -> Iterator[None]:
    """The one lock a process holds while it changes a home's store or ledger."""
    try:
        lock = FileLock(str(home.lock_path), timeout=LOCK_TIMEOUT_S)
        lock.acquire()
    except Timeout:
        raise StoreError(
            f"another mendd process has held {home.lock_path} for {LOCK_TIMEOUT_S:.0f} s; "
            "wait for it (or stop the service) and retry. Nothing was changed.") from None
    try:
        yield
    finally:
        lock.release()
