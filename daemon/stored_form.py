"""The stored form of what an edit adds: a routed memory's entries and an editor's shares as the
plain tensors the store keeps (safetensors: tensors and one string map per file), and back."""
from __future__ import annotations

import json

import torch

from editors import compression
from editors.compression import narrowest, widened
from editors.routing import Entry, Memory
from editors.types import Share
from store.versions import MemoryChunk, StoredShare


def memory_chunk(memory: Memory, entries: list[Entry]) -> MemoryChunk:
    """New entries as stored: their shares, the memory's centre, its block and τ."""
    return MemoryChunk(tuple(entry_to_stored(e) for e in entries), {"centre": memory.centre.float().contiguous()},
                       {"layer": str(memory.layer), "tau": str(memory.tau)})


def is_routed(chunk: MemoryChunk) -> bool:
    return "layer" in chunk.metadata


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
