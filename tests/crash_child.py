"""A child process that makes one store change, for tests that kill it with MENDD_CRASH_AT.

Usage: python tests/crash_child.py HOME edit|routed|rollback
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from daemon.commits import commit_delta, commit_entries, rollback
from daemon.config import load_config
from daemon.home import Home
from daemon.versioning import changing
from editors.routing import Entry, Memory
from store_helpers import FACTS, mend_delta


def main(root: str, action: str) -> None:
    home = Home(Path(root))
    with changing(home, load_config(home)) as (versions, _recovery):
        if action == "edit":
            commit_delta(versions, mend_delta(FACTS[:1]), run_id="run-crash", figures={"locality": 1.0})
        elif action == "routed":  # a routed version: one memory entry, no weight change
            [share] = mend_delta(FACTS[:1]).shares
            entry = Entry(share.correction_ids[0], torch.ones(8), 0.5, share.low_rank)
            commit_entries(versions, Memory(1, 0.8, torch.zeros(8)), [entry], run_id="run-crash", figures={})
        else:
            rollback(versions, "v0000", reason="crash test")


if __name__ == "__main__":
    main(*sys.argv[1:])
