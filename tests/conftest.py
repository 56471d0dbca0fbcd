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


@pytest.fixture(scope="session")
def data_root():
    """The editing data the repository carries (a developer's MENDD_DATA does not change it)."""
    from policies.probes import BUNDLED_DATA

    return BUNDLED_DATA


@pytest.fixture(scope="session")
def tiny():
    """The tiny Llama, ready for editing (shared: editing never changes it in place)."""
    from editors.editable import Editable
    from store.models import load_model

    loaded = load_model("tiny-llama")
    return Editable(loaded.model, loaded.tokenizer)


@pytest.fixture(scope="session")
def smollm2():
    """The real default model, loaded once for the few tests that prove quality."""
    from editors.editable import Editable
    from store.models import load_model

    loaded = load_model("smollm2-135m")
    return Editable(loaded.model, loaded.tokenizer)
