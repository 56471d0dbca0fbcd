"""Everything a decision needs, opened once: the served model, the editor, the gate, the store,
the ledger and the MLflow experiment. The service keeps one for its lifetime; a CLI command opens
one, uses it, and closes it."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from daemon import tracking
from daemon.config import ConfigError, MenddConfig
from daemon.home import Home
from daemon.suite_files import load_keys, load_suites, routing_reference
from daemon.versioning import Versions, load_served_model, open_versions, recover, stored_memory
from editors import routing
from editors.editable import Editable
from editors.formats import from_record
from editors.registry import Editor, guarded, make_editor, relation_reader
from editors.routing import Entry, Memory, Reference, Routed
from editors.types import Correction, Delta
from policies.gate import Gate, Weights
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


def service_editor(home: Home, editable: Editable, config: MenddConfig) -> Editor:
    """The editor as the home's service runs it: its network and step, projected and aggregated as
    configured."""
    settings = config.editor
    editor = make_editor(settings.name, editable, config.model, settings.path, settings.mend_step_scale(),
                         settings.edits_chat_questions())
    lsq = settings.aggregation == "least_squares"
    return guarded(editor, editable, load_keys(home) if settings.projection or lsq else None,
                   settings.projection_threshold if settings.projection else None,
                   settings.aggregation_strength if lsq else None)


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
    memory: Memory | None = field(init=False)  # the routed memory served (editor.memory routed), else None
    reference: Reference | None = field(init=False)

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
        self.editable = Editable(self.loaded.model, self.loaded.tokenizer, self.config.editor.edit_layers,
                                 self.config.caches.budgets())
        settings = self.config.editor
        self.memory = self.reference = None
        if settings.memory == "routed":
            self._open_memory()
        elif self.records.versions.store.has_memory():
            raise ConfigError(
                f"the store's model/ holds a routed memory ({self.records.versions.store.memory_dir}), but "
                "editor.memory is weights: set editor.memory: routed to serve it")
        self.editor = service_editor(self.home, self.editable, self.config)
        self.gate = Gate(self.editable, load_suites(self.home), self.policy)
        self.served = version

    def _open_memory(self) -> None:
        settings = self.config.editor
        if settings.name != "mend" or settings.aggregation != "sum":
            raise ConfigError(f"editor.memory routed keeps each correction's own update, which only the mend editor "
                              f"with editor.aggregation sum gives; editor.name is {settings.name}, editor.aggregation "
                              f"is {settings.aggregation}")
        if settings.routing_layer > self.editable.anatomy.first:
            raise ConfigError(
                f"editor.routing_layer is {settings.routing_layer}, after the first edited block "
                f"({self.editable.anatomy.first}): keys must be read before any edited block")
        self.reference = routing_reference(self.home, self.editable, settings.routing_layer)
        self.memory = stored_memory(self.records.versions, settings.routing_layer, settings.routing_tau,
                                     settings.routing_margin, self.reference,
                                     relation_reader(self.config.model, settings.relation_floor))

    def served_weights(self) -> Weights:
        """The served model's weights as the gate takes them."""
        return Routed(self.memory) if self.memory is not None else self.editable.weights()

    def with_delta(self, delta: Delta, corrections: list[Correction]) -> Weights:
        """The served weights plus `delta`: summed in, or as new routed entries."""
        if self.memory is not None:
            return Routed(self.memory.plus(self.entries(delta, corrections)))
        current = self.editable.weights()
        return {name: current[name] + change for name, change in delta.tensors().items()}

    def entries(self, delta: Delta, corrections: list[Correction]) -> list[Entry]:
        """A delta's per-correction updates as routed-memory entries."""
        return routing.entries(self.editable, [(share.correction_ids[0], share.low_rank) for share in delta.shares],
                               corrections, self.reference, self.config.editor.compression())

    def use_policy(self, policy: Policy) -> None:
        self.policy = policy
        self.gate.policy = policy

    @property
    def home(self) -> Home:
        return self.records.home

    def close(self) -> None:
        self.records.close()
