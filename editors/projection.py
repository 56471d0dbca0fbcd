"""Keep edits away from what must be preserved: AlphaEdit's null-space projection, for any editor.

At each edited tensor W (out × in) the preserved knowledge is summarised by the keys K0 that reach
it, the tensor's inputs on text the edit must not disturb. An update ΔW changes the output on those
keys by ΔW K0; projecting the update's input side onto the null space of K0 K0ᵀ,
ΔW' = ΔW P with P = Σ_{λ_i small} v_i v_iᵀ, makes ΔW' K0 ≈ 0. For MEND's low-rank updates
ΔW = Σ δ̃ ũᵀ this is ũ ← P ũ: the update stays low-rank and each correction's share stays
exactly subtractable.
"""
from __future__ import annotations

import torch

from editors.batching import TokenBatch, text_batch
from editors.editable import Editable
from editors.types import Correction, Delta, LowRankUpdate, Share


def edit_inputs(editable: Editable, batch: TokenBatch) -> dict[str, torch.Tensor]:
    """The keys: each editable tensor's inputs at every real token of `batch`, [tokens, in_features]."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for tensor in editable.anatomy.editable:
        def capture(_module, args, _output, name=tensor.name):
            captured[name] = args[0].detach()
        handles.append(tensor.module.register_forward_hook(capture))
    try:
        with torch.no_grad():
            editable.logits(batch)
    finally:
        for handle in handles:
            handle.remove()
    real = batch.real_positions | batch.answer_positions
    return {name: inputs[real] for name, inputs in captured.items()}


def key_covariance(editable: Editable, batches: list[TokenBatch]) -> dict[str, torch.Tensor]:
    """K0 K0ᵀ per editable tensor: the sum of outer products of its inputs over every real token."""
    covariance = {t.name: torch.zeros(t.in_features, t.in_features, dtype=torch.float64) for t in editable.anatomy.editable}
    for batch in batches:
        for name, keys in edit_inputs(editable, batch).items():
            keys = keys.double()
            covariance[name] += keys.T @ keys
    return covariance


def null_space_projector(covariance: torch.Tensor, relative_threshold: float) -> torch.Tensor:
    """P onto the eigenvectors of K0 K0ᵀ whose eigenvalue is below threshold × the largest."""
    values, vectors = torch.linalg.eigh(covariance)
    small = vectors[:, values < relative_threshold * values.max()]
    return (small @ small.T).float()


def project_update(update: LowRankUpdate, projector: torch.Tensor) -> LowRankUpdate:
    return LowRankUpdate(inputs=update.inputs @ projector, outputs=update.outputs, scale=update.scale,
                         transposed=update.transposed)


def project_dense(change: torch.Tensor, projector: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A dense ΔW (out × in, or in × out for Conv1D) with its input side projected."""
    return projector @ change if transposed else change @ projector


class ProjectedEditor:
    """Any editor, with every update's input side projected away from the preserved keys."""

    def __init__(self, inner, projectors: dict[str, torch.Tensor], transposed: dict[str, bool]):
        self.inner, self.projectors, self.transposed = inner, projectors, transposed
        self.name = f"{inner.name}+projection"

    def propose(self, editable: Editable, corrections: list[Correction]) -> Delta:
        delta = self.inner.propose(editable, corrections)
        shares = [Share(share.correction_ids,
                        low_rank={n: project_update(u, self.projectors[n]) for n, u in share.low_rank.items()},
                        dense={n: project_dense(d, self.projectors[n], self.transposed[n]) for n, d in share.dense.items()})
                  for share in delta.shares]
        return Delta(editor=delta.editor, shares=shares, holding=delta.holding, invalid=delta.invalid)


def preserved_batches(editable: Editable, pairs: list[tuple[str, str]], chunks: list[list[int]]) -> list[TokenBatch]:
    batches = [editable.batch(pairs[i : i + 64]) for i in range(0, len(pairs), 64)]
    return batches + [text_batch(chunks)]


def null_space_projectors(covariance: dict[str, torch.Tensor], relative_threshold: float) -> dict[str, torch.Tensor]:
    return {n: null_space_projector(c.double(), relative_threshold) for n, c in covariance.items()}


def projected(inner, editable: Editable, covariance: dict[str, torch.Tensor], relative_threshold: float) -> ProjectedEditor:
    return ProjectedEditor(inner, null_space_projectors(covariance, relative_threshold),
                           {t.name: t.transposed for t in editable.anatomy.editable})
