"""New versions: an edit, a routed memory's new entries, a rollback or a revert committed to the
store, and the ledger brought into agreement (`versioning.recorded`)."""
from __future__ import annotations

import json
from dataclasses import replace

from daemon.stored_form import memory_chunk, share_from_stored, share_to_stored
from daemon.versioning import Versions, recorded
from editors.formats import ID_RULE, is_valid_id
from editors.routing import Entry, Memory
from editors.types import Delta
from store.errors import StoreError, UnknownCorrectionError
from store.ledger import Ledger
from store.lineage import in_effect
from store.versions import Change, MemoryChunk, Version


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


def commit_change(versions: Versions, change: Change) -> Version:
    """Commit ``change`` to the store, then bring the ledger into agreement."""
    _require_valid_ids(change.corrections)
    if change.kind == "edit":
        _refuse_reapplying(versions.ledger, change.corrections)
    return recorded(versions, versions.store.commit(change))


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
    return recorded(versions, versions.store.rollback(tag, reason))


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


def _ledger_status(ledger: Ledger, correction_id: str) -> str:
    try:
        found = ledger.correction(correction_id)
    except UnknownCorrectionError:
        return "the ledger has no correction with this id"
    where = f" at {found.version}" if found.version else ""
    return f"its status is {found.status.value}{where}" + (f": {found.reason}" if found.reason else "")
