"""A child process that makes one store change, for tests that kill it with MENDD_CRASH_AT.

Usage: python tests/crash_child.py HOME edit|rollback
"""

from __future__ import annotations

import sys
from pathlib import Path

from daemon.config import load_config
from daemon.home import Home
from daemon.versioning import changing, commit_delta, rollback
from store_helpers import FACTS, mend_delta


def main(root: str, action: str) -> None:
    home = Home(Path(root))
    with changing(home, load_config(home)) as (versions, _recovery):
        if action == "edit":
            commit_delta(versions, mend_delta(FACTS[:1]), run_id="run-crash", figures={"locality": 1.0})
        else:
            rollback(versions, "v0000", reason="crash test")


if __name__ == "__main__":
    main(*sys.argv[1:])
