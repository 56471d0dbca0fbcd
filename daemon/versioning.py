"""Versions seen from the daemon: each change to the store together with its ledger record.

The store (store/versions.py) takes plain tensors and knows nothing of editors; this module turns
an editor's Delta into new tensor values plus per-correction factors, and back again for a revert.
Every function that changes the store then brings the ledger into agreement with it, and
:func:`recover` does the same after a crash, so the ledger can always be rebuilt from the store.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from daemon.config import MenddConfig
from daemon.home import Home
from editors import compression
from editors.compression import narrowest, widened
from editors.formats import ID_RULE, is_valid_id
from editors.memory_model import RelationReader
from editors.routing import Entry, Memory, Reference
from editors.types import Delta, Share
from store.crash import BEFORE_LEDGER, crash_point
from store.errors import StoreError, UnknownCorrectionError
from store.ledger import Ledger
from store.lineage import in_effect
from store.models import LoadedModel, load_model
from store.versions import Change, MemoryChunk, Recovery, StoredShare, Version, VersionStore

LOCK_TIMEOUT_S = 60.0


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
def home_lock(home: Home) -> Iterator[None]:
    """The one lock a process holds while it changes a home's store or ledger."""
    try:
        lock = FileLock(str(home.lock_path), timeout=LOCK_TIMEOUT_S)
        lock.acquire()
    except Timeout:
        raise StoreError(
            f"another mendd process has held {home.lock_path} for {LOCK_TIMEOUT_S:.0f} s; "
            "wait for it (or stop the service) and retry. Nothing was changed.") from None
    try:
        yield
    finally:
        lock.release()


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


def commit_delta(versions: Versions, delta: Delta, *, run_id: str | None, figures: dict[str, float]) -> Version:
    """A new version: the head's weights plus ``delta``, with each share's factors kept."""
    return commit_change(versions, edit_change(versions, delta, run_id=run_id, figures=figures))


def edit_change(versions: Versions, delta: Delta, *, run_id: str | None, figures: dict[str, float]) -> Change:
    """The new values of the tensors ``delta`` touches (head + ΔW), and its factors as plain tensors."""
    changes = delta.tensors()
    current = versions.store.read_tensors(list(changes))
    return Change(
        kind="edit",
        tensors={name: current[name] + update.to(current[name].dtype) for name, update in changes.items()},
        shares=tuple(share_to_stored(share) for share in delta.shares),
        corrections=tuple(delta.correction_ids), run_id=run_id, figures=figures)


def commit_entries(versions: Versions, memory: Memory, entries: list[Entry], *, run_id: str | None,
                   figures: dict[str, float]) -> Version:
    """A new version: the head's routed memory plus ``entries`` (the weights unchanged), as the
    chunk ``model/memory/<tag>``."""
    return commit_chunk(versions, memory_chunk(memory, entries), run_id=run_id, figures=figures)


def commit_chunk(versions: Versions, chunk: MemoryChunk, *, run_id: str | None, figures: dict[str, float]) -> Version:
    corrections = tuple(cid for share in chunk.shares for cid in share.correction_ids)
    return commit_change(versions, Change(kind="edit", tensors={}, corrections=corrections, run_id=run_id,
                                          figures=figures, memory_added=chunk))


def memory_chunk(memory: Memory, entries: list[Entry]) -> MemoryChunk:
    """New entries as stored: their shares, the memory's centre, its block and τ."""
    return MemoryChunk(tuple(entry_to_stored(e) for e in entries), {"centre": memory.centre.float().contiguous()},
                       {"layer": str(memory.layer), "tau": str(memory.tau)})


def is_routed(chunk: MemoryChunk) -> bool:
    return "layer" in chunk.metadata


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


def entry_to_stored(entry: Entry) -> StoredShare:
    """An entry as a share's tensors plus ``route/key``, ``route/floor``, ``route/target``,
    ``route/subject`` and ``route/aliases`` (a JSON list) as UTF-8 bytes (safetensors holds only
    tensors and one string map per file) and, where it has them, ``route/lead`` and ``route/relation``."""
    stored = share_to_stored(Share((entry.correction_id,), low_rank=entry.update))
    route = {"route/key": narrowest(entry.key.float().contiguous()),
             "route/floor": torch.tensor(entry.floor, dtype=torch.float64)}
    aliases = json.dumps(list(entry.aliases), ensure_ascii=False) if entry.aliases else None
    for name, text in (("target", entry.target), ("subject", entry.subject), ("aliases", aliases)):
        if text is not None:
            route[f"route/{name}"] = torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)
    for name, state in (("lead", entry.lead), ("relation", entry.relation)):
        if state is not None:
            route[f"route/{name}"] = narrowest(state.float().contiguous())
    return StoredShare(stored.correction_ids, {**stored.tensors, **route})


def entry_from_stored(stored: StoredShare) -> Entry:
    """An entry stored before targets were kept has none: it then acts for the whole answer; one
    stored before leads were kept is routed on its key alone; one stored before relations were kept
    gives way to a namesake that has one; one stored before subjects were kept serves a query
    whatever its text names; one stored without aliases answers to its subject alone."""
    target, subject, aliases = (stored.tensors.get(f"route/{name}") for name in ("target", "subject", "aliases"))
    lead, relation = (stored.tensors.get(f"route/{name}") for name in ("lead", "relation"))
    return Entry(stored.correction_ids[0], widened(stored.tensors["route/key"]), stored.tensors["route/floor"].item(),
                 _low_rank(stored), _text(target), widened(lead) if lead is not None else None,
                 widened(relation) if relation is not None else None, _text(subject),
                 tuple(json.loads(_text(aliases))) if aliases is not None else ())


def _text(stored: torch.Tensor | None) -> str | None:
    return bytes(stored.tolist()).decode("utf-8") if stored is not None else None


def commit_change(versions: Versions, change: Change) -> Version:
    """Commit ``change`` to the store, then bring the ledger into agreement."""
    _require_valid_ids(change.corrections)
    if change.kind == "edit":
        _refuse_reapplying(versions.ledger, change.corrections)
    return _recorded(versions, versions.store.commit(change))


def _require_valid_ids(ids: tuple[str, ...]) -> None:
    """Refuse an id outside the id rule, so nothing unvalidated reaches git (the feeds refuse them
    first; the store escapes whatever it writes, this is the second line)."""
    bad = [cid for cid in ids if not is_valid_id(cid)]
    if bad:
        raise StoreError(f"correction id {json.dumps(str(bad[0])[:60])} is not {ID_RULE}; nothing was changed")


def _refuse_reapplying(ledger: Ledger, corrections: tuple[str, ...]) -> None:
    """The last guard against a change added twice (a retried approval, a decision made again after
    a crash): a correction the weights already carry is never applied on top of itself."""
    carried = ledger.applied_at(list(corrections))
    if carried:
        shown = ", ".join(f"{cid!r} (at {tag})" for cid, tag in sorted(carried.items()))
        raise StoreError(f"already applied: {shown}; applying again would add the change twice. Nothing was "
                         "changed; `mendd revert` removes a correction before it is applied again")


def rollback(versions: Versions, tag: str, reason: str) -> Version:
    return _recorded(versions, versions.store.rollback(tag, reason))


def revert_change(versions: Versions, correction_id: str, reason: str) -> Change:
    """A new version's change: the head's weights minus the share that carried ``correction_id``.

    Corrections applied after it keep their change, because deltas add. A share of several
    corrections (fine-tuning edits a batch as one) is removed whole, and the version names them all.
    """
    head = versions.store.require_clean()
    carried = in_effect(versions.store.versions(), head.tag)
    if correction_id not in carried:
        status = _ledger_status(versions.ledger, correction_id)
        raise UnknownCorrectionError(
            f"correction {correction_id!r} is not in the weights of the current version {head.tag} ({status}); "
            "nothing was changed")
    chunk = versions.store.memory_chunk(carried[correction_id])
    if chunk is not None:  # a routed entry: its chunk is rewritten without it
        kept = tuple(s for s in chunk.shares if correction_id not in s.correction_ids)
        return Change(kind="revert", tensors={}, corrections=(correction_id,), reason=reason,
                      memory_rewritten={carried[correction_id]: replace(chunk, shares=kept)})
    share = next(share for share in versions.store.shares(carried[correction_id]) if correction_id in share.correction_ids)
    removal = share_from_stored(share).tensors()
    current = versions.store.read_tensors(list(removal))
    return Change(
        kind="revert",
        tensors={name: current[name] - update.to(current[name].dtype) for name, update in removal.items()},
        corrections=share.correction_ids, reason=reason)


def adopt_checkout(versions: Versions) -> Version | None:
    """If an operator checked out an earlier version in the store (``git checkout vNNNN --
    model.dvc && dvc checkout``), commit that as a rollback and record it; else None."""
    workspace = versions.store.workspace()
    if workspace.state != "checked-out":
        return None
    restored = workspace.version.tag
    version = _recorded(versions, versions.store.adopt_checkout(f"operator checked out {restored} in the store"))
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


def share_to_stored(share: Share) -> StoredShare:
    """A share as plain tensors: ``<tensor>/inputs``, ``/outputs``, ``/scale`` (left out when it is
    1.0), ``/transposed`` (left out when false); or ``<tensor>/dense`` for a dense share. Each factor
    is kept in the narrowest form that holds it bit for bit (editors/compression.py rounds a routed
    entry's factors so): 4- or 8-bit codes with their scales in one uint8 tensor (``/inputs.q4``),
    else bfloat16, else as it is."""
    tensors: dict[str, torch.Tensor] = {}
    for name, update in share.low_rank.items():
        kept = compression.compact_update(update)
        tensors |= _factor_tensors(f"{name}/inputs", kept.compact_inputs)
        tensors |= _factor_tensors(f"{name}/outputs", kept.compact_outputs)
        if not (isinstance(update.scale, float) and update.scale == 1.0):
            tensors[f"{name}/scale"] = _scale_tensor(update.scale)
        if update.transposed:
            tensors[f"{name}/transposed"] = torch.tensor(True)
    for name, dense in share.dense.items():
        tensors[f"{name}/dense"] = dense
    return StoredShare(tuple(share.correction_ids), tensors)


def share_from_stored(stored: StoredShare) -> Share:
    dense = {key.rsplit("/", 1)[0]: tensor for key, tensor in stored.tensors.items() if key.endswith("/dense")}
    low_rank = {name: update.widened() for name, update in _low_rank(stored).items()}
    return Share(stored.correction_ids, low_rank=low_rank, dense=dense)


def _low_rank(stored: StoredShare) -> dict[str, compression.CompactUpdate]:
    """A share's low-rank updates as stored: compact, not widened (a routed entry keeps them so)."""
    low_rank = {}
    for key in stored.tensors:
        name, part = key.rsplit("/", 1)
        if part.split(".")[0] == "inputs":
            scale, transposed = stored.tensors.get(f"{name}/scale"), stored.tensors.get(f"{name}/transposed")
            low_rank[name] = compression.CompactUpdate(
                _factor(stored.tensors, f"{name}/inputs"), _factor(stored.tensors, f"{name}/outputs"),
                scale=_scale_value(scale) if scale is not None else 1.0,
                transposed=bool(transposed.item()) if transposed is not None else False)
    return low_rank


def _factor_tensors(key: str, factor: compression.CompactFactor) -> dict[str, torch.Tensor]:
    return {f"{key}.q{factor.bits}" if factor.bits is not None else key: factor.held}


def _factor(tensors: dict[str, torch.Tensor], key: str) -> compression.CompactFactor:
    for bits in (4, 8):
        if f"{key}.q{bits}" in tensors:
            return compression.CompactFactor(tensors[f"{key}.q{bits}"], bits)
    return compression.CompactFactor(tensors[key])


def _scale_tensor(scale: float | torch.Tensor) -> torch.Tensor:
    """The scale in its own type (an editor's tensor, or a float as float64), so the rebuilt
    update multiplies exactly as the original did, bit for bit."""
    if isinstance(scale, torch.Tensor):
        return scale.detach().clone()
    return torch.tensor(scale, dtype=torch.float64)


def _scale_value(stored: torch.Tensor) -> float | torch.Tensor:
    return stored.item() if stored.dtype == torch.float64 else stored


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


def _recorded(versions: Versions, version: Version) -> Version:
    crash_point(BEFORE_LEDGER)
    sync_ledger(versions)
    push(versions)
    return version


def _ledger_status(ledger: Ledger, correction_id: str) -> str:
    try:
        found = ledger.correction(correction_id)
    except UnknownCorrectionError:
        return "the ledger has no correction with this id"
    where = f" at {found.version}" if found.version else ""
    return f"its status is {found.status.value}{where}" + (f": {found.reason}" if found.reason else "")


def _remote_url(home: Home, remote: str | None) -> str | None:
    """A remote without a scheme is a folder; a relative one is taken from the home."""
    if remote is None or "://" in remote:
        return remote
    return str((home.root / Path(remote).expanduser()).resolve())
