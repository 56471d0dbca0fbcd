"""Health names a full disk in one recognisable way, whichever step ran out of room."""
from __future__ import annotations

import errno
import os
import sqlite3

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
