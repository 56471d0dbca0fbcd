"""Reference editors: fine-tuning the same tensors (the baseline every figure is set against), and none."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from editors import scoring
from editors.editable import Editable
from editors.admission import admissible
from editors.types import Correction, Delta, Share


@dataclass
class FineTuneEditor:
    """A few Adam steps on the edit prompts' answer NLL, on the editable tensors only (FT-L style)."""

    steps: int = 10
    lr: float = 5e-4
    name: str = "ft"

    def propose(self, editable: Editable, corrections: list[Correction]) -> Delta:
        delta = Delta(editor=self.name)
        ready = admissible(editable, corrections, delta)
        if not ready:
            return delta
        batch = editable.batch([(c.prompt, c.target_new) for c in ready])
        base = {name: w.detach() for name, w in editable.weights().items()}
        shifts = {name: torch.zeros_like(w, requires_grad=True) for name, w in base.items()}
        optimizer = torch.optim.Adam(shifts.values(), lr=self.lr)
        with torch.enable_grad():
            for _ in range(self.steps):
                logits = editable.logits(batch, {n: base[n] + shifts[n] for n in base})
                loss = scoring.mean_nll(logits, batch.answer_labels, batch.row_of_answer, len(ready)).sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        # one share for the batch: its steps cannot be split between corrections
        delta.shares.append(Share(correction_ids=tuple(c.id for c in ready),
                                  dense={n: s.detach().clone() for n, s in shifts.items()}))
        return delta


@dataclass
class NoEditor:
    """Changes nothing: the reference row of every table."""

    name: str = "none"

    def propose(self, editable: Editable, corrections: list[Correction]) -> Delta:
        delta = Delta(editor=self.name)
        admissible(editable, corrections, delta)
        return delta
