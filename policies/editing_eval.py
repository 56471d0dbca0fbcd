"""Measure an editor the way the field does: edit records, score the edited model against the original.

Every metric compares the model with a candidate delta against the same model without it; the
model itself is never changed (candidate weights go through the suffix functionally).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch

from editors import scoring
from editors.batching import TokenBatch, text_batch
from editors.editable import Editable
from editors.registry import Editor
from editors.types import Correction, LocalityPrompt


@dataclass(frozen=True)
class EditReport:
    editor: str
    n: int
    batch_size: int
    reliability: float
    generalization: float
    neighborhood: float
    locality: float
    cf_success: float
    ppl_drawdown: float
    edit_seconds_median: float
    holding: int  # records the model already answered as asked
    invalid: int  # records that could not be edited (see errors)

    def as_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


class Probes:
    """Pre-edit references for the fixed unrelated set and the perplexity text, computed once."""

    def __init__(self, editable: Editable, unrelated: list[LocalityPrompt], ppl_chunks: list[list[int]]):
        self.editable = editable
        # batches of similar length waste little on padding
        pairs = sorted(((p.prompt, p.answer) for p in unrelated), key=lambda pair: len(pair[0]) + len(pair[1]))
        self.unrelated = [editable.batch(chunk) for chunk in _chunks(pairs, 32)]
        self.text = text_batch(tuple(map(tuple, ppl_chunks)))
        with torch.no_grad():
            self.unrelated_before = [editable.logits(b) for b in self.unrelated]
            self.nll_before = self.text_nll(None)

    def text_nll(self, weights: dict[str, torch.Tensor] | None) -> float:
        logits = self.editable.logits(self.text, weights)
        return scoring.token_nll(logits, self.text.answer_labels).mean().item()

    def locality(self, weights: dict[str, torch.Tensor]) -> float:
        rows = [
            scoring.agreement(before, self.editable.logits(b, weights), b.row_of_answer, len(b.lengths))
            for b, before in zip(self.unrelated, self.unrelated_before)
        ]
        return torch.cat(rows).mean().item()

    def ppl_drawdown(self, weights: dict[str, torch.Tensor]) -> float:
        return scoring.perplexity_change(self.text_nll(weights), self.nll_before)


def evaluate_editor(editable: Editable, editor: Editor, records: list[Correction], probes: Probes,
                    batch_size: int = 1, progress: Callable[[int], None] | None = None) -> EditReport:
    per_record: dict[str, list[float]] = {k: [] for k in ("reliability", "generalization", "neighborhood", "cf_success")}
    per_batch: dict[str, list[float]] = {"locality": [], "ppl": []}
    seconds: list[float] = []
    holding = invalid = 0
    base = editable.weights()
    for batch in _chunks(records, batch_size):
        started = time.perf_counter()
        delta = editor.propose(editable, batch)
        seconds.append(time.perf_counter() - started)
        holding += len(delta.holding)
        invalid += len(delta.invalid)
        bad = {e.correction_id for e in delta.invalid}
        scored = [c for c in batch if c.id not in bad]
        weights = {n: base[n] + t for n, t in delta.tensors().items()}
        with torch.no_grad():
            for key, values in record_scores(editable, scored, weights).items():
                per_record[key].extend(values)
            per_batch["locality"].append(probes.locality(weights))
            per_batch["ppl"].append(probes.ppl_drawdown(weights))
        if progress:
            progress(len(batch))
    mean = lambda xs: statistics.fmean(xs) if xs else float("nan")  # noqa: E731
    return EditReport(
        editor=editor.name, n=len(per_record["reliability"]), batch_size=batch_size,
        reliability=mean(per_record["reliability"]), generalization=mean(per_record["generalization"]),
        neighborhood=mean(per_record["neighborhood"]), locality=mean(per_batch["locality"]),
        cf_success=mean(per_record["cf_success"]), ppl_drawdown=mean(per_batch["ppl"]),
        edit_seconds_median=statistics.median(seconds) if seconds else float("nan"),
        holding=holding, invalid=invalid,
    )


def record_scores(editable: Editable, records: list[Correction], weights: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per record: reliability, generalization, neighborhood and cf_success under `weights`."""
    if not records:
        return {}
    out: dict[str, list[float]] = {}
    edits = editable.batch([(c.prompt, c.target_new) for c in records])
    out["reliability"] = _accuracy(editable, edits, weights)
    rephrased = [(c.rephrases[0], c.target_new) for c in records if c.rephrases]
    out["generalization"] = _accuracy(editable, editable.batch(rephrased), weights) if rephrased else []
    neighbours = [(lp.prompt, lp.answer) for c in records for lp in c.locality_prompts[:1]]
    if neighbours:
        b = editable.batch(neighbours)
        agree = scoring.agreement(editable.logits(b), editable.logits(b, weights), b.row_of_answer, len(b.lengths))
        out["neighborhood"] = agree.tolist()
    with_old = [c for c in records if c.target_old]
    if with_old:
        new = editable.batch([(c.prompt, c.target_new) for c in with_old])
        old = editable.batch([(c.prompt, c.target_old) for c in with_old])
        nll_new = _nll(editable, new, weights)
        nll_old = _nll(editable, old, weights)
        out["cf_success"] = (nll_new < nll_old).float().tolist()
    return out


def _accuracy(editable: Editable, batch: TokenBatch, weights) -> list[float]:
    logits = editable.logits(batch, weights)
    return scoring.accuracy(logits, batch.answer_labels, batch.row_of_answer, len(batch.lengths)).tolist()


def _nll(editable: Editable, batch: TokenBatch, weights) -> torch.Tensor:
    return scoring.mean_nll(editable.logits(batch, weights), batch.answer_labels, batch.row_of_answer, len(batch.lengths))


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def served_accuracy(editable: Editable, corrections: list[Correction], weights=None, chunk: int = 64) -> tuple[float | None, float | None]:
    """Reliability and generalization of the served model over `corrections`: the share of their
    prompts, and of all their rephrasings, whose every target token is the argmax. None: nothing to score."""
    def share(pairs: list[tuple[str, str]]) -> float | None:
        if not pairs:
            return None
        with torch.no_grad():
            hits = [a for part in _chunks(pairs, chunk) for a in _accuracy(editable, editable.batch(part), weights)]
        return sum(hits) / len(hits)

    return (share([(c.prompt, c.target_new) for c in corrections]),
            share([(r, c.target_new) for c in corrections for r in c.rephrases]))
