"""Everything a decision needs, opened once: the served model, the editor, the gate, the store,
the ledger and the MLflow experiment. The service keeps one for its lifetime; a CLI command opens
one, uses it, and closes it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from daemon import tracking
from daemon.config import MenddConfig
from daemon.home import Home
from daemon.suite_files import load_suites
from daemon.versioning import Versions, load_served_model, open_versions, recover
from editors.editable import Editable
from editors.registry import Editor, make_editor
from policies.gate import Gate
from policies.policy import Policy, load_policy
from store.models import LoadedModel
from store.versions import Version


@dataclass
class Records:
    """Where decisions are kept: the version store with its ledger, and the MLflow experiment."""

    home: Home
    versions: Versions
    mlflow: Any  # MlflowClient
    experiment: str  # experiment id

    @classmethod
    def open(cls, home: Home, config: MenddConfig) -> "Records":
        return cls.around(home, config, open_versions(home, config))

    @classmethod
    def around(cls, home: Home, config: MenddConfig, versions: Versions) -> "Records":
        """Records for versions opened by the caller (e.g. under the home lock)."""
        client = tracking.client(config.mlflow.tracking_uri)
        name = tracking.experiment_name(config.mlflow.experiment, config.model)
        return cls(home, versions, client, tracking.experiment_id(client, name, home.mlflow_artifacts))

    def close(self) -> None:
        self.versions.close()


@dataclass
class Runtime:
    config: MenddConfig
    records: Records
    served: Version
    loaded: LoadedModel
    editable: Editable
    editor: Editor
    policy: Policy
    gate: Gate

    @classmethod
    def open(cls, home: Home, config: MenddConfig) -> "Runtime":
        """Recover the store, load the version it holds, and make the editor and gate ready.

        The policy is read first: a bad policy file stops the start before any slow work."""
        policy = load_policy(config.policy)
        records = Records.open(home, config)
        try:
            recover(records.versions)
            served = records.versions.store.head()
            loaded = load_served_model(records.versions)
            editable = Editable(loaded.model, loaded.tokenizer, config.editor.edit_layers)
            editor = make_editor(config.editor.name, editable, config.model, config.editor.path)
            gate = Gate(editable, load_suites(home), policy)
        except BaseException:
            records.close()
            raise
        return cls(config, records, served, loaded, editable, editor, policy, gate)

    @property
    def home(self) -> Home:
        return self.records.home

    def close(self) -> None:
        self.records.close()
