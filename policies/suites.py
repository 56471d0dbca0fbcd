"""Regression suites: what a change must leave alone, pinned once from the base model.

- locality: unrelated prompts (facts the base model gets right, questions, running text), each with
  the base model's argmax token and top-k log-probabilities at every answer position;
- perplexity: a fixed WikiText-2 sample and the base model's NLL on it;
- retention: the committed corrections themselves (their prompts and rephrasings), read from the
  ledger when a gate runs, so it always agrees with the store.

The references come from the base model, so a suite measures drift from the model the operator
started with, not from the previous version (damage cannot creep in a little per version).
Suites are plain records here; reading and writing them is the daemon's business.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from editors.batching import pair_ids, text_batch
from editors.editable import Editable
from editors.memory_model import entry_names
from editors.types import Correction
from policies.probes import unrelated_prompts, wikitext_chunks

TOP_K = 5
BATCH = 64


@dataclass(frozen=True)
class Probe:
    """An unrelated prompt, the text teacher-forced after it, and the reference model's predictions there."""

    prompt: str
    answer: str
    kind: str  # fact | question | text | operator
    reference: tuple[int, ...]  # argmax token id at each answer position
    top_ids: tuple[tuple[int, ...], ...]  # the top-k token ids at each answer position
    top_logprobs: tuple[tuple[float, ...], ...]


@dataclass(frozen=True)
class PerplexitySample:
    chunks: tuple[tuple[int, ...], ...]  # token ids; the first of each chunk is context only
    base_nll: float  # mean NLL per predicted token under the reference model


@dataclass(frozen=True)
class Suites:
    model: str
    pinned_from: str  # the version whose weights gave the references
    locality: tuple[Probe, ...]
    perplexity: PerplexitySample

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Suites":
        raw = json.loads(text)
        probes = tuple(Probe(p["prompt"], p["answer"], p["kind"], tuple(p["reference"]),
                             tuple(map(tuple, p["top_ids"])), tuple(map(tuple, p["top_logprobs"])))
                       for p in raw["locality"])
        ppl = PerplexitySample(tuple(map(tuple, raw["perplexity"]["chunks"])), raw["perplexity"]["base_nll"])
        return cls(raw["model"], raw["pinned_from"], probes, ppl)

    def extended(self, probes: list[Probe]) -> "Suites":
        """These suites plus `probes`, skipping any prompt+answer already present."""
        seen = {(p.prompt, p.answer) for p in self.locality}
        fresh = tuple(p for p in probes if (p.prompt, p.answer) not in seen)
        return Suites(self.model, self.pinned_from, self.locality + fresh, self.perplexity)


@dataclass(frozen=True)
class RetentionProbe:
    """A committed correction's prompt (or one of its rephrasings) that must keep its target."""

    correction_id: str
    prompt: str
    target: str


def retention_probes(corrections: list[Correction]) -> list[RetentionProbe]:
    return [RetentionProbe(c.id, prompt, c.target_new) for c in corrections for prompt in (c.prompt, *c.rephrases)]


@dataclass(frozen=True)
class Carried:
    """An applied correction as the retention sample reads it: its id and its subject's names."""

    id: str
    names: frozenset[str]  # casefolded: its subject and aliases

    @classmethod
    def of(cls, correction: Correction) -> "Carried":
        return cls(correction.id, _casefolded(entry_names(correction.subject, correction.aliases)))

    @classmethod
    def of_record(cls, correction_id: str, record: dict) -> "Carried":
        """From a correction's record as the ledger keeps it (editors/formats.to_record)."""
        return cls(correction_id, _casefolded(entry_names(record.get("subject"), record.get("aliases", ()))))


def _casefolded(names: tuple[str, ...]) -> frozenset[str]:
    return frozenset(name.casefold() for name in names)


def retention_sample(applied: list[Carried], new: list[Correction], recent: int, older: int) -> list[Carried]:
    """The earlier corrections a decision checks (`applied` oldest first), so that its cost stays
    flat as they grow: every one about a subject a new correction names (by its subject or an
    alias: the likeliest to lose their answer to it), the `recent` latest, and `older` of the rest
    drawn at random, seeded by the new corrections' ids so that a decision can be judged again on
    the same sample."""
    subjects = frozenset().union(*(Carried.of(c).names for c in new))
    same = [c for c in applied if c.names & subjects]
    taken = {c.id for c in same}
    latest = [c for c in applied[::-1] if c.id not in taken][:recent]
    taken |= {c.id for c in latest}
    rest = [c for c in applied if c.id not in taken]
    seed = int.from_bytes(hashlib.sha256("\n".join(sorted(c.id for c in new)).encode()).digest()[:8], "big")
    drawn = random.Random(seed).sample(rest, min(older, len(rest)))
    chosen = taken | {c.id for c in drawn}
    return [c for c in applied if c.id in chosen]


def known_facts(root: Path) -> list[tuple[str, str]]:
    """ROME's known facts (prompt, true object): facts a model of this size often knows."""
    records = json.loads((root / "known" / "known_1000.json").read_text())
    return [(r["prompt"], r["attribute"]) for r in records if r.get("prompt") and r.get("attribute")]


def pin(editable: Editable, model: str, version: str, root: Path, n_facts: int = 1000, seed: int = 0) -> Suites:
    """Build the default suites from the editing data with the model as it is now (the base).

    Facts are kept only where the model's argmax already gives every token of the true object:
    the suite then guards answers that are right, which is what an operator fears to lose.
    """
    rng = random.Random(seed)
    facts = known_facts(root)
    facts = rng.sample(facts, min(n_facts, len(facts)))
    fact_probes = [p for p in references(editable, facts, "fact") if _answered_right(editable, p)]
    general = unrelated_prompts(root, n_questions=200, n_sentences=300, seed=seed, half=0)
    questions = references(editable, [(g.prompt, g.answer) for g in general[:200]], "question")
    text = references(editable, [(g.prompt, g.answer) for g in general[200:]], "text")
    chunks = wikitext_chunks(root, editable.tokenizer, n_chunks=8, chunk_tokens=128)
    return Suites(model, version, tuple(fact_probes + questions + text), perplexity_sample(editable, chunks))


def references(editable: Editable, pairs: list[tuple[str, str]], kind: str) -> list[Probe]:
    """Probes for (prompt, answer) pairs with the model's current predictions as the reference."""
    probes: list[Probe] = []
    for start in range(0, len(pairs), BATCH):
        chunk = pairs[start : start + BATCH]
        batch = editable.batch(chunk)
        with torch.no_grad():
            logprobs = torch.log_softmax(editable.logits(batch).float(), -1)
        top = logprobs.topk(TOP_K, dim=-1)
        rows = batch.row_of_answer
        for i, (prompt, answer) in enumerate(chunk):
            mine = rows == i
            probes.append(Probe(
                prompt, answer, kind, tuple(logprobs[mine].argmax(-1).tolist()),
                tuple(map(tuple, top.indices[mine].tolist())),
                tuple(tuple(round(x, 4) for x in row) for row in top.values[mine].tolist())))
    return probes


def perplexity_sample(editable: Editable, chunks: list[list[int]]) -> PerplexitySample:
    batch = text_batch(tuple(map(tuple, chunks)))
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(editable.logits(batch).float(), batch.answer_labels)
    return PerplexitySample(tuple(map(tuple, chunks)), nll.item())


def _answered_right(editable: Editable, probe: Probe) -> bool:
    _, answer_ids = pair_ids(editable.tokenizer, probe.prompt, probe.answer)
    return list(probe.reference) == answer_ids
