"""A home's versions opened: the store and its ledger together, opening, and recovery.

The store (store/versions.py) takes plain tensors and knows nothing of editors. Every change to the
store (daemon/commits.py) is then `recorded`: the ledger brought into agreement with it; `recover`
does the same after a crash, so the ledger can always be rebuilt from the store. The home lock is
daemon/home_lock.py; the stored form of entries and shares is daemon/stored_form.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from daemon.config import MenddConfig
from daemon.home import Home
from daemon.home_lock import home_lock
from daemon.stored_form import entry_from_stored
from editors.memory_model import RelationReader
from editors.routing import Memory, Reference
from store.crash import BEFORE_LEDGER, crash_point
from store.errors import StoreError
from store.ledger import Ledger
from store.lineage import in_effect
from store.models import LoadedModel, load_model
from store.versions import Recovery, Version, VersionStore


@dataclass
class Versions:
    """A home's version store and ledger, opened together."""

    store: VersionStore
    ledger: Ledger

    def close(self) -> None:
        self.store.close()
        self.ledger.close()


def create_versions(home: Home, model: torch.nn.Module, tokenizer, spec: str) -> Version:
    """Commit the base model as v0000 and record it in a new ledger (``mendd init``)."""
    store = VersionStore.create(home.store_dir, model, tokenizer, spec)
    versions = Versions(store, Ledger(home.ledger_url))
    try:
        sync_ledger(versions)
        return store.head()
    finally:
        versions.close()


def open_versions(home: Home, config: MenddConfig) -> Versions:
    store = VersionStore(home.store_dir)
    if not store.exists():
        raise StoreError(
            f"no version store at {home.store_dir}: this home predates versioning or its init was "
            f"interrupted; run `mendd --home {home.root} init --force --model SPEC` (it rewrites mendd.yaml with "
            "the defaults, so keep a copy of your settings)")
    store.configure(_remote_url(home, config.store.remote))
    return Versions(store, Ledger(home.ledger_url))


@contextmanager
def changing(home: Home, config: MenddConfig) -> Iterator[tuple[Versions, Recovery]]:
    """Hold the home lock, open the versions, and recover from any crash before changing them."""
    with home_lock(home):
        versions = open_versions(home, config)
        try:
            yield versions, recover(versions)
        finally:
            versions.close()


def recover(versions: Versions) -> Recovery:
    """Run at start: undo or finish an interrupted commit, adopt an operator's checkout made while
    mendd was stopped, and record every store version the ledger is missing."""
    recovery = versions.store.recover()
    if recovery.action != "none":
        versions.ledger.record_event(
            "recovery", f"an interrupted commit of {recovery.tag} was {recovery.action}; removed: "
            f"{', '.join(recovery.removed) or 'nothing'}", versions.store.head().tag)
    adopt_checkout(versions)
    sync_ledger(versions)
    push(versions)
    return recovery


def sync_ledger(versions: Versions) -> None:
    """Record, oldest first, each store version the ledger lacks."""
    recorded = set(versions.ledger.recorded_tags())
    history = versions.store.versions()
    for version in history:
        if version.tag not in recorded:
            versions.ledger.record_version(version, in_effect(history, version.tag))


def stored_memory(versions: Versions, layer: int, tau: float, margin: float, reference: Reference,
                  reader: RelationReader | None = None) -> Memory:
    """The routed memory in the store's model/, served at `tau` and `margin` with `reader`; empty
    (centred by `reference`) when no version has added entries yet."""
    chunks = versions.store.memory_chunks()
    if not chunks:
        return Memory(layer, tau, reference.centre, margin=margin, reader=reader)
    first = chunks[0][1]
    if int(first.metadata["layer"]) != layer:
        raise StoreError(
            f"the routed memory in {versions.store.memory_dir} is keyed at block {first.metadata['layer']}, but "
            f"editor.routing_layer is {layer}; set it back to {first.metadata['layer']} (keys made at one block "
            "cannot be compared with states at another)")
    entries = tuple(entry_from_stored(share) for _, chunk in chunks for share in chunk.shares)
    return Memory(layer, tau, first.common["centre"], entries, margin, reader)


def adopt_checkout(versions: Versions) -> Version | None:
    """If an operator checked out an earlier version in the store (``git checkout vNNNN --
    model.dvc && dvc checkout``), commit that as a rollback and record it; else None."""
    workspace = versions.store.workspace()
    if workspace.state != "checked-out":
        return None
    restored = workspace.version.tag
    version = recorded(versions, versions.store.adopt_checkout(f"operator checked out {restored} in the store"))
    versions.ledger.record_event(
        "operator-checkout", f"model/ was checked out to {restored} by hand; committed as {version.tag}", version.tag)
    return version


def served_version(versions: Versions, served: Version) -> Version | None:
    """The service's check, between cycles: the version it should serve now, if not ``served``.

    An operator's checkout is adopted first; a store still half-way through one (``dvc checkout``
    not run yet) is left alone until it settles. The caller holds the home lock and, when this
    returns a version, reloads with :func:`load_served_model`.
    """
    adopted = adopt_checkout(versions)
    if adopted is None and versions.store.workspace().state != "clean":
        return None  # half-way through a checkout, or changes mendd did not make: wait for them
    current = adopted or versions.store.head()
    if current.model_md5 == served.model_md5:
        return None
    versions.ledger.record_event("reload", f"serving {current.tag} instead of {served.tag}", current.tag)
    return current


def load_served_model(versions: Versions) -> LoadedModel:
    """The model in the store's ``model/`` folder (the head, once the store is clean)."""
    return load_model(f"hf:{versions.store.model_dir}")


def push(versions: Versions) -> bool:
    """Push the head's files to the DVC remote, if one is set. A failure is recorded, not raised:
    the version is committed locally either way, and the next push (at the next commit, or at
    start) sends the head again; `dvc push --all-tags` in the store sends every version."""
    try:
        versions.store.push()
    except StoreError as error:
        versions.ledger.record_event("push-failed", str(error), versions.store.head().tag)
        return False
    return True


def recorded(versions: Versions, version: Version) -> Version:
    crash_point(BEFORE_LEDGER)
    sync_ledger(versions)
    push(versions)
    return version


def _remote_url(home: Home, remote: str | None) -> str | None:
    """A remote without a scheme is a folder; a relative one is taken from the home."""
    if remote is None or "://" in remote:
        return remote
    return str((home.root / Path(remote).expanduser()).resolve())
