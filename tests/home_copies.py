"""A home made once and copied per test: copying takes milliseconds where making one takes seconds
(`mendd init` ~20 s on 2 cores; a home with committed versions, more)."""
from __future__ import annotations

import shutil
from pathlib import Path


def copy_home(source: Path, target: Path) -> Path:
    """`source` copied to `target`. The store's DVC settings follow the home when it is opened; the
    MLflow store would not (its experiment keeps an absolute artifact path), so a source must not
    have one yet: neither `init` nor a commit makes it, only a decision's run does."""
    assert not (source / "mlflow" / "mlflow.db").exists(), f"{source} has an MLflow store: its artifact paths would point back"
    shutil.copytree(source, target, symlinks=True)
    return target
