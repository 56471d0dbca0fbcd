"""Least-squares aggregation of a batch's updates (MALMEN, Tan et al., ICLR 2024), regularised by
the preserved keys (as MEMIT's closed form is).

Summed, each correction's MEND update also moves the other corrections' outputs and, through its
pseudo-inputs ũ, every input that overlaps them. Instead, each correction i asks only for the
output change its own update makes on its own keys K_i (the tensor's inputs at its tokens):
V_i = ΔW_i K_i. One ΔW meets all of them in the least-squares sense while moving the preserved
keys K0 as little as possible:

    ΔW = argmin Σ_i ||ΔW K_i − V_i||² + λ ||ΔW K0||² / n0  =  V Kᵀ (K Kᵀ + λ C̄0)⁻¹

with C̄0 = K0 K0ᵀ / n0 the preserved keys' second moment. Each correction keeps its own low-rank
share (outputs V_i, inputs K_i A⁻¹), so a share can still be subtracted exactly.

With a null-space projector P (editors/projection.py) the solve happens inside the null space, as
AlphaEdit's does: ΔW = M P with M fitted on the projected keys P K, so the update is exactly null on
the preserved keys' main directions and still meets the corrections' values as well as it can there.
"""
from __future__ import annotations

import torch

from editors.editable import Editable
from editors.projection import edit_inputs
from editors.types import Correction, Delta, LowRankUpdate, Share

RIDGE = 1e-6  # relative to the keys' scale: keeps A invertible where neither K nor K0 reaches
# A correction's keys are read after these openings too (as ROME averages its key over random
# prefixes), so the solved change holds for the fact in other contexts, not only its own prompt.
CONTEXTS = ("", "Here is a fact. ", "I read that ", "Q: Tell me something. A: ", "As everyone knows, ")


def own_values(update: LowRankUpdate, keys: torch.Tensor) -> torch.Tensor:
    """[k, out]: the output change `update` makes on `keys` [k, in] (ΔW k for each key)."""
    return (keys @ update.inputs.T) @ (update.outputs * update.scale)


def normal_matrix(keys: list[torch.Tensor], preserved: torch.Tensor, strength: float) -> torch.Tensor:
    """A = K Kᵀ + λ C̄0 (+ a tiny ridge), in float64; C̄0 is K0 K0ᵀ scaled to the keys' mean square."""
    stacked = torch.cat(keys).double()
    scale = (stacked * stacked).sum(1).mean()
    second_moment = preserved.double() * (scale / preserved.trace())
    eye = torch.eye(stacked.shape[1], dtype=torch.float64)
    return stacked.T @ stacked + strength * second_moment + RIDGE * scale * eye


def aggregate(updates: list[LowRankUpdate], keys: list[torch.Tensor], preserved: torch.Tensor, strength: float,
              projector: torch.Tensor | None = None) -> list[LowRankUpdate]:
    """Each correction's update replaced by its share of the least-squares ΔW (same tensor); with a
    projector P, of ΔW = M P fitted on the projected keys."""
    values = [own_values(u, k) for u, k in zip(updates, keys)]
    if projector is not None:
        p = projector.double()
        keys = [k.double() @ p for k in keys]
        preserved = p @ preserved.double() @ p
    inverse = torch.linalg.inv(normal_matrix(keys, preserved, strength))
    if projector is not None:
        inverse = inverse @ p
    return [LowRankUpdate(inputs=(k.double() @ inverse).float(), outputs=v.float(), scale=1.0, transposed=u.transposed)
            for u, k, v in zip(updates, keys, values)]


class LeastSquaresEditor:
    """A low-rank editor (MEND) whose batch updates are aggregated by least squares."""

    def __init__(self, inner, preserved: dict[str, torch.Tensor], strength: float,
                 projectors: dict[str, torch.Tensor] | None = None, contexts: tuple[str, ...] = CONTEXTS):
        self.inner, self.preserved, self.strength, self.projectors = inner, preserved, strength, projectors
        self.contexts = contexts
        self.name = f"{inner.name}+lsq" + ("+projection" if projectors else "")

    def propose(self, editable: Editable, corrections: list[Correction]) -> Delta:
        delta = self.inner.propose(editable, corrections)
        if not delta.shares:
            return delta
        by_id = {c.id: c for c in corrections}
        owners = [by_id[share.correction_ids[0]] for share in delta.shares]
        keys_per_share = [edit_inputs(editable, editable.batch([(context + c.prompt, c.target_new) for context in self.contexts]))
                          for c in owners]
        new_low_rank: list[dict[str, LowRankUpdate]] = [{} for _ in delta.shares]
        for name in delta.shares[0].low_rank:
            updates = [share.low_rank[name] for share in delta.shares]
            keys = [k[name] for k in keys_per_share]
            projector = self.projectors[name] if self.projectors else None
            for i, update in enumerate(aggregate(updates, keys, self.preserved[name], self.strength, projector)):
                new_low_rank[i][name] = update
        shares = [Share(share.correction_ids, low_rank=low_rank) for share, low_rank in zip(delta.shares, new_low_rank)]
        return Delta(editor=delta.editor, shares=shares, holding=delta.holding, invalid=delta.invalid)
