"""The commit journal: one small file saying "a commit of vNNNN on top of <sha> has begun".

Written before the first file of a commit is touched and removed after the tag is set, so after a
crash recovery knows that the store's changes are mendd's own half-finished commit (undo it, or
finish it if git already has the commit), and never mistakes an operator's edits for one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from store.checkpoint import fsync_dir

JOURNAL = ".mendd-commit.json"


@dataclass(frozen=True)
class Intent:
    tag: str
    parent_sha: str
    kind: str


def journal_path(root: Path) -> Path:
    return root / JOURNAL


def begin(root: Path, intent: Intent) -> None:
    path = journal_path(root)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(asdict(intent)), encoding="utf-8")
    with open(partial, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, path)
    fsync_dir(root)


def pending(root: Path) -> Intent | None:
    path = journal_path(root)
    if not path.exists():
        return None
    return Intent(**json.loads(path.read_text(encoding="utf-8")))


def finish(root: Path) -> None:
    journal_path(root).unlink(missing_ok=True)
    fsync_dir(root)
