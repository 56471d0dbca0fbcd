"""Everything a decision needs, opened once: the served model, the editor, the gate, the store,
the ledger and the MLflow experiment. The service keeps one for its lifetime; a CLI command opens
one, uses it, and closes it."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from daemon import tracking
from daemon.config import MenddConfig
from daemon.home import Home
from daemon.suite_files import load_keys, load_suites
from daemon.versioning import Versions, load_served_model, open_versions, recover
from editors.editable import Editable
from editors.formats import from_record
from editors.registry import Editor, guarded, make_editor
from editors.types import Correction
from policies.gate import Gate
from policies.policy import Policy, load_policy
from store.ledger import LedgerCorrection
from store.models import LoadedModel
from store.versions import Version


def ledger_corrections(rows: Iterable[LedgerCorrection]) -> list[Correction]:
    """Ledger rows as the corrections they were received as."""
    return [from_record(row.external_id, row.payload, row.feed) for row in rows]


@dataclass
class Records:
    """Where decisions are kept: the version store with its ledger, and the MLflow experiment."""

    home: Home
    versions: Versions
    mlflow: Any  # MlflowClient
    experiment_name: str
    _experiment: str | None = None

    @property
    def experiment(self) -> str:
        """The experiment's id, looked up (or created) on first use: a tracking server that is down
        stops the first decision, not the service's start."""
        if self._experiment is None:
            self._experiment = tracking.experiment_id(self.mlflow, self.experiment_name, self.home.mlflow_artifacts)
        return self._experiment

    @classmethod
    def open(cls, home: Home, config: MenddConfig) -> "Records":
        return cls.around(home, config, open_versions(home, config))

    @classmethod
    def around(cls, home: Home, config: MenddConfig, versions: Versions) -> "Records":
        """Records for versions opened by the caller (e.g. under the home lock)."""
        client = tracking.client(config.mlflow.tracking_uri)
        return cls(home, versions, client, tracking.experiment_name(config.mlflow.experiment, config.model))

    def close(self) -> None:
        self.versions.close()


@dataclass
class Runtime:
    config: MenddConfig
    records: Records
    policy: Policy
    served: Version = field(init=False)
    loaded: LoadedModel = field(init=False)
    editable: Editable = field(init=False)
    editor: Editor = field(init=False)
    gate: Gate = field(init=False)

    @classmethod
    def open(cls, home: Home, config: MenddConfig) -> "Runtime":
        """Recover the store, load the version it holds, and make the editor and gate ready.

        The policy is read first: a bad policy file stops the start before any slow work."""
        policy = load_policy(config.policy)
        records = Records.open(home, config)
        try:
            recover(records.versions)
            runtime = cls(config, records, policy=policy)
            runtime.load(records.versions.store.head())
        except BaseException:
            records.close()
            raise
        return runtime

    def load(self, version: Version) -> None:
        """Serve `version` (the store's head): load its model, then make the editor and gate ready."""
        self.loaded = load_served_model(self.records.versions)
        self.editable = Editable(self.loaded.model, self.loaded.tokenizer, self.config.editor.edit_layers)
        settings = self.config.editor
        editor = make_editor(settings.name, self.editable, self.config.model, settings.path)
        lsq = settings.aggregation == "least_squares"
        self.editor = guarded(editor, self.editable, load_keys(self.home) if settings.projection or lsq else None,
                              settings.projection_threshold if settings.projection else None,
                              settings.aggregation_strength if lsq else None)
        self.gate = Gate(self.editable, load_suites(self.home), self.policy)
        self.served = version

    def use_policy(self, policy: Policy) -> None:
        self.policy = policy
        self.gate.policy = policy

    @property
    def home(self) -> Home:
        return self.records.home

    def close(self) -> None:
        self.records.close()
