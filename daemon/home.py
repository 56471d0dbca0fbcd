"""The mendd home: the one folder that holds every piece of a daemon's state.

Keeping everything under one root means a home can be backed up, moved or deleted as a unit, and
two daemons (two models) never share state by accident.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from daemon.config import render_default_config

HOME_ENV = "MENDD_HOME"
DEFAULT_HOME = Path("~/.mendd")


class HomeError(Exception):
    """The home cannot be created as asked; the message says why and what to do."""


@dataclass(frozen=True)
class Home:
    root: Path

    def __post_init__(self) -> None:
        # Absolute, so the sqlite:/// URIs below and paths handed to git/DVC/MLflow do not depend
        # on the current directory.
        object.__setattr__(self, "root", Path(self.root).expanduser().absolute())

    @property
    def config_path(self) -> Path:
        return self.root / "mendd.yaml"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def store_dir(self) -> Path:
        return self.root / "store"

    @property
    def mlflow_dir(self) -> Path:
        return self.root / "mlflow"

    @property
    def mlflow_db_uri(self) -> str:
        return f"sqlite:///{self.mlflow_dir / 'mlflow.db'}"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.mlflow_dir / "artifacts"

    @property
    def ledger_url(self) -> str:
        return f"sqlite:///{self.state_dir / 'ledger.db'}"

    @property
    def suites_path(self) -> Path:
        """The regression suites pinned from the base model (policies/suites.py)."""
        return self.root / "suites" / "suites.json"

    @property
    def keys_path(self) -> Path:
        """Covariances of the preserved keys at each edited tensor, for the null-space projection."""
        return self.root / "suites" / "keys.safetensors"

    @property
    def routing_path(self) -> Path:
        """Held-out prompts' states at the routing block: the routed memory's centre and key floors."""
        return self.root / "suites" / "routing.safetensors"

    @property
    def held_dir(self) -> Path:
        """Candidate deltas of held decisions, waiting for a person: <run id>.safetensors."""
        return self.state_dir / "held"

    @property
    def quarantine_path(self) -> Path:
        """One JSON line per record a feed could not use: when, which feed, where, why."""
        return self.state_dir / "quarantine.jsonl"

    @property
    def health_path(self) -> Path:
        """The running service's health and counters, rewritten on every tick."""
        return self.state_dir / "health.json"

    @property
    def service_lock_path(self) -> Path:
        """Held by the one `mendd run` of this home for its lifetime; says who holds it."""
        return self.state_dir / "service.lock"

    @property
    def lock_path(self) -> Path:
        """Held by the one process allowed to change this home at a time."""
        return self.state_dir / "mendd.lock"


def resolve_home(cli_value: Path | None) -> Home:
    """``--home`` if given, else ``$MENDD_HOME``, else ``~/.mendd``."""
    chosen = cli_value or os.environ.get(HOME_ENV) or DEFAULT_HOME
    return Home(Path(chosen))


def check_new_home(home: Home, force: bool) -> None:
    """Refuse to overwrite an existing home's config unless ``force``; checked before slow work."""
    if home.config_path.exists() and not force:
        raise HomeError(
            f"{home.config_path} already exists, so {home.root} is already a mendd home. "
            "Use another --home, or pass --force to overwrite its config with the defaults."
        )


def init_home(home: Home, model_spec: str, force: bool = False, settings: dict | None = None) -> Home:
    """Create the home's folders and a commented default ``mendd.yaml`` for ``model_spec`` (with
    `settings`, nested like the file, in place of the defaults).

    An existing config is an operator's work, so it is only replaced with ``force``.
    """
    check_new_home(home, force)
    for folder in (home.root, home.state_dir, home.store_dir, home.mlflow_dir, home.mlflow_artifacts):
        folder.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name and renamed, so a crash never leaves a half-written config.
    partial = home.config_path.with_suffix(".yaml.tmp")
    partial.write_text(render_default_config(model_spec, settings), encoding="utf-8")
    partial.replace(home.config_path)
    return home
