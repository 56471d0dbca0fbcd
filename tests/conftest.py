"""Shared fixtures: every test runs with no MENDD_* variables from the developer's shell."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: a torch thread pool per worker (and per `mendd` child, which inherits
    # this) would oversubscribe the cores, and spinning OpenMP threads slow each test several-fold.
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True)
def clean_mendd_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's MENDD_HOME or MENDD_BATCH_SIZE must not change what the tests see.
    for name in list(os.environ):
        if name.upper().startswith("MENDD_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """`mendd demo` run once, for the long tests that read what it prints and the home it leaves
    (minutes on 2 cores; the demo's own limit is 1500 s)."""
    root = tmp_path_factory.mktemp("demo") / "demo"
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MENDD_")}
    result = subprocess.run([str(Path(sys.executable).with_name("mendd")), "demo", "--demo-home", str(root)],
                            capture_output=True, text=True, timeout=1500, env=env)
    return root, result


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


@pytest.fixture(scope="session")
def initialized_home(tmp_path_factory) -> Path:
    """A tiny-llama home made once per session by the real `mendd init`; tests take copies."""
    root = tmp_path_factory.mktemp("initialized") / "home"
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MENDD_")}
    made = subprocess.run([str(Path(sys.executable).with_name("mendd")), "--home", str(root), "init", "--model", "tiny-llama"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert made.returncode == 0, made.stderr
    return root


@pytest.fixture
def tiny_home(initialized_home: Path, tmp_path: Path) -> Path:
    """This test's own copy of the session's `mendd init` home."""
    from home_copies import copy_home

    return copy_home(initialized_home, tmp_path / "home")
