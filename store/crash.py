"""Injected crash points, so tests can kill a real process at each step of a commit.

A crash test runs a child process with ``MENDD_CRASH_AT=<point>``; when the code reaches that point
the process sends itself SIGKILL, which no handler can catch, exactly like a power cut or the OOM
killer. In production the variable is unset and each point is one dictionary look-up.
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "MENDD_CRASH_AT"

# The steps of a commit, in the order they happen (store/versions.py and daemon/commits.py).
TENSORS_WRITTEN = "tensors-written"
DVC_ADDED = "dvc-added"
GIT_COMMITTED = "git-committed"
TAGGED = "tagged"
BEFORE_LEDGER = "before-ledger"
# A rollback, between restoring the old model.dvc and committing it.
ROLLBACK_CHECKED_OUT = "rollback-checked-out"

COMMIT_POINTS = (TENSORS_WRITTEN, DVC_ADDED, GIT_COMMITTED, TAGGED, BEFORE_LEDGER)

# The service's steps around a commit (daemon/feeds.py, daemon/cycle.py).
FEED_STORED = "feed-stored"  # a feed chunk is in the ledger, the feed's cursor not yet saved
PROPOSED = "proposed"  # the editor has proposed a delta
JUDGED = "judged"  # the gate has decided, nothing recorded yet
TRACKED = "tracked"  # the MLflow run is written, nothing committed yet

SERVICE_POINTS = (FEED_STORED, PROPOSED, JUDGED, TRACKED)

# A held decision and its approval (daemon/review.py).
HELD_SAVED = "held-saved"  # the held candidate's file is written, its corrections not yet marked held
APPROVAL_COMMITTED = "approval-committed"  # an approval's version is committed, the run not yet settled

REVIEW_POINTS = (HELD_SAVED, APPROVAL_COMMITTED)


def crash_point(name: str) -> None:
    """Kill this process with SIGKILL if ``MENDD_CRASH_AT`` names this point, saying so on stderr
    first: a test can then tell a kill at the point from a process that died some other way."""
    if os.environ.get(CRASH_ENV) == name:
        os.write(2, reached(name).encode() + b"\n")
        os.kill(os.getpid(), signal.SIGKILL)


def reached(name: str) -> str:
    """The line a process writes to stderr when it kills itself at crash point `name`."""
    return f"mendd: crash point {name} reached, sending SIGKILL"
