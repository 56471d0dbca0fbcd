"""Use no more force than an edit needs: each correction's update scaled to the smallest step that lands it.

A trained editor gives every correction the same learned step size. Most edits need less, and
the surplus is what spills onto unrelated prompts. Here each correction's low-rank update is tried
at a ladder of multiples of its step, smallest first, and keeps the first at which its own prompt
answers the new target (every answer token the argmax, mean probability at least `min_probability`),
also after each of a few neutral openings (ROME's context trick), so that an edit which only just
holds on the exact wording is not taken for one that lands. Only the correction's own prompt
decides; rephrasings and probes are never looked at. A scaled share is still a low-rank update, so
it stays exactly subtractable.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from editors import scoring
from editors.aggregation import CONTEXTS
from editors.editable import Editable
from editors.types import Correction, Delta, Share, stacked_dense

LADDER = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


def scaled_share(share: Share, factor: float) -> Share:
    return Share(share.correction_ids, low_rank={n: replace(u, scale=u.scale * factor) for n, u in share.low_rank.items()},
                 dense={n: d * factor for n, d in share.dense.items()})


def landed(logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, n_rows: int, min_probability: float) -> torch.Tensor:
    """Per sequence: every answer token is the argmax and the mean answer NLL is within the margin."""
    exact = scoring.accuracy(logits, labels, rows, n_rows) >= 1.0
    confident = scoring.mean_nll(logits, labels, rows, n_rows) <= -math.log(min_probability)
    return exact & confident


def step_factors(editable: Editable, corrections: list[Correction], shares: list[Share], ladder: tuple[float, ...],
                 min_probability: float, contexts: tuple[str, ...] = CONTEXTS) -> list[float]:
    """The rung of `ladder` each share needs, found for the whole batch at once: every round applies
    all shares at their current rungs and moves up those whose correction has not landed yet."""
    batch = editable.batch([(context + c.prompt, c.target_new) for c in corrections for context in contexts])
    base = editable.weights()
    rung = [0] * len(shares)
    while True:
        trial = [scaled_share(share, ladder[r]) for share, r in zip(shares, rung)]
        weights = dict(base)
        for name in {n for share in trial for n in share.low_rank}:
            weights[name] = base[name] + stacked_dense([s.low_rank[name] for s in trial if name in s.low_rank])
        with torch.no_grad():
            logits = editable.logits(batch, weights)
        ok = landed(logits, batch.answer_labels, batch.row_of_answer, len(batch.lengths), min_probability)
        ok = ok.view(len(shares), len(contexts)).all(dim=1)
        climbing = [i for i in range(len(shares)) if not ok[i] and rung[i] < len(ladder) - 1]
        if not climbing:
            return [ladder[r] for r in rung]
        for i in climbing:
            rung[i] += 1


class SizedEditor:
    """Any editor whose shares carry one correction each, with each share's step sized to land it."""

    def __init__(self, inner, min_probability: float = 0.5, ladder: tuple[float, ...] = LADDER,
                 contexts: tuple[str, ...] = CONTEXTS):
        self.inner, self.min_probability, self.ladder, self.contexts = inner, min_probability, ladder, contexts
        self.name = f"{inner.name}+sizing"

    def propose(self, editable: Editable, corrections: list[Correction]) -> Delta:
        delta = self.inner.propose(editable, corrections)
        if not delta.shares or any(len(share.correction_ids) != 1 for share in delta.shares):
            return delta  # a batch-wide share (fine-tuning) cannot be sized per correction
        by_id = {c.id: c for c in corrections}
        edited = [by_id[share.correction_ids[0]] for share in delta.shares]
        factors = step_factors(editable, edited, delta.shares, self.ladder, self.min_probability, self.contexts)
        shares = [scaled_share(share, f) for share, f in zip(delta.shares, factors)]
        return Delta(editor=delta.editor, shares=shares, holding=delta.holding, invalid=delta.invalid)
