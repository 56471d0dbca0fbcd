"""Shared fixtures: every test runs with no MENDD_* variables from the developer's shell."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def clean_mendd_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's MENDD_HOME or MENDD_BATCH_SIZE must not change what the tests see.
    for name in list(os.environ):
        if name.upper().startswith("MENDD_"):
            monkeypatch.delenv(name)
