"""Measure what the served model says (issue #20): edit records into the model the way the home
serves them (all N in one routed memory, or summed into the weights), then read greedy
continuations beside the base model's on the same prompts.

Figures, over the corrections that were edited (`editors/reading.py` for the text measures):
- gen_prompt / gen_rephrase: the new target appears in the continuation of the correction's prompt /
  of its rephrasings;
- nbhd_kept: neighbourhood prompts whose first 4 generated words equal the base model's;
  nbhd_leak: neighbourhood prompts that now say the new target and did not before;
- other_leak / other_changed: other questions about each corrected subject (`policies/relations.py`:
  another relation's template or question, "Isaac Newton studied at" beside "Isaac Newton was born
  in -> Rome") whose answer now says the new target and did not before / whose first 4 words differ
  from the base model's; the correction should answer its own question and no other (issue #35);
- fluency: mean n-gram entropy of the continuations (prompts and rephrasings) over the base model's
  on the same prompts; repetition: share of them with a word 2-gram said 3+ times, beside the base's;
- chat_success: questions (prompts ending in "?", as zsRE's) asked through the model's chat template
  whose answer contains the new target; None without a chat template or questions;
- reliability / generalization: the teacher-forced figures, through the same served path.
"""
from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch

from editors import routing
from editors.editable import Editable
from editors.memory_model import RelationReader, is_question
from editors.reading import first_words, goes_back, mentions, newly_says, ngram_entropy, repeats
from editors.registry import Editor
from editors.routing import NONE, Entry, Memory, Reference, Routed
from editors.serving import chat_answers, continuations, serving_entries
from editors.settings import Compression
from editors.types import Correction
from policies.editing_eval import served_accuracy
from policies.probes import data_dir
from policies.relations import OtherQuestion, load_relations, questions_about

TOKENS = 20  # continuation length the figures read
ROWS = 32  # prompts generated at once
# Other questions asked per corrected subject, drawn with this seed: fixed, so runs compare
OTHER_PER_CORRECTION, OTHER_SEED = 2, 0


@dataclass(frozen=True)
class ServedReport:
    memory: str  # routed or weights
    subject: bool  # the records kept their subject field
    n: int  # corrections edited into the served model
    reliability: float | None
    generalization: float | None
    gen_prompt: float | None
    gen_rephrase: float | None
    nbhd_kept: float | None
    nbhd_leak: float | None
    other_leak: float | None  # None when no correction's relation is known
    other_changed: float | None
    back_to_old: float | None  # of the answers that say the target, those that go back to the old fact after it
    fluency: float | None
    repetition: float | None
    repetition_base: float | None
    chat_success: float | None
    samples: tuple[dict, ...]  # a few prompts with the base and the served continuation

    def as_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Served:
    """The served model: a routed memory over the unchanged weights, or summed weights."""

    editable: Editable
    memory: Memory | None = None
    weights: dict[str, torch.Tensor] | None = None

    @classmethod
    def of(cls, editable: Editable, weights: "dict[str, torch.Tensor] | Routed") -> "Served":
        """The served model for weights as the gate takes them (policies/gate.py Weights)."""
        if isinstance(weights, Routed):
            return cls(editable, weights.memory, weights.weights)
        return cls(editable, weights=weights)

    def say(self, prompts: list[str], tokens: int = TOKENS) -> list[str]:
        return self._answer(prompts, lambda part: continuations(self.editable, part, tokens, self.memory))

    def chat(self, questions: list[str], tokens: int = TOKENS) -> list[str]:
        return self._answer(questions, lambda part: chat_answers(self.editable, part, tokens, self.memory))

    def _answer(self, prompts: list[str], answer: Callable[[list[str]], list[str]]) -> list[str]:
        """`answer` in batches, with the model's own weights swapped for summed ones when it has them."""
        if not prompts or self.weights is None:
            return in_batches(prompts, answer)
        with self.editable.using_weights(self.weights):
            return in_batches(prompts, answer)

    def teacher_forced(self, corrections: list[Correction]) -> tuple[float | None, float | None]:
        weights = Routed(self.memory, self.weights) if self.memory is not None else self.weights
        return served_accuracy(self.editable, corrections, weights)


def routed_alike(now: Served, then: Served, prompts: list[str]) -> list[bool]:
    """Per prompt, whether `then` answers it as `now` does without being asked: both are routed
    memories over the same weights that send it to the same entry (the same object), or to none. A
    gate's candidate differs from the served memory only by new entries, so most prompts that are not
    a new correction's own need no answer from either."""
    if not prompts or now.memory is None or then.memory is None or now.weights is not then.weights:
        return [False] * len(prompts)

    def entries(memory: Memory) -> list[Entry | None]:
        return [memory.entries[j] if j != NONE else None for j in serving_entries(now.editable, prompts, memory)]

    return [a is b for a, b in zip(entries(now.memory), entries(then.memory))]


def answered_as(served: Served, prompts: list[str], known: list[str], alike: list[bool], tokens: int = TOKENS) -> list[str]:
    """`served`'s answers to `prompts`: `known` where `alike` says it answers as the model that gave
    those, generated for the rest."""
    asked = [i for i, same in enumerate(alike) if not same]
    out = list(known)
    for i, text in zip(asked, served.say([prompts[i] for i in asked], tokens)):
        out[i] = text
    return out


def in_batches(prompts: list[str], answer: Callable[[list[str]], list[str]]) -> list[str]:
    """`answer` over batches of ROWS prompts of similar length (a left-padded batch costs its
    longest prompt), in the prompts' order."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    for start in range(0, len(order), ROWS):
        part = order[start : start + ROWS]
        for i, text in zip(part, answer([prompts[i] for i in part])):
            out[i] = text
    return out


def without_subject(corrections: list[Correction]) -> list[Correction]:
    return [replace(c, subject=None) for c in corrections]


def edit_all(editable: Editable, editor: Editor, corrections: list[Correction], reference: Reference | None, tau: float, margin: float,
             batch_size: int = 1, progress: Callable[[int], None] | None = None,
             how: Compression | None = None, reader: RelationReader | None = None) -> tuple[Served, list[Correction]]:
    """Edit every correction (in batches) into one served model; returns it and the corrections
    it carries (those the editor could not edit, or that the model already answered, are left out).
    With a reference, the edits are routed entries, compressed as `how` says."""
    base = editable.weights()
    summed = {name: tensor.clone() for name, tensor in base.items()}
    entries: list[routing.Entry] = []
    edited: list[Correction] = []
    for start in range(0, len(corrections), batch_size):
        batch = corrections[start : start + batch_size]
        delta = editor.propose(editable, batch)
        left_out = {e.correction_id for e in delta.invalid} | set(delta.holding)
        carried = [c for c in batch if c.id not in left_out]
        if reference is not None:
            entries += routing.entries(editable, [(s.correction_ids[0], s.low_rank) for s in delta.shares], carried,
                                       reference, how)
        else:
            for name, change in delta.tensors().items():
                summed[name] += change
        edited += carried
        if progress:
            progress(len(batch))
    if reference is not None:
        return Served(editable, memory=Memory(reference.layer, tau, reference.centre, tuple(entries), margin, reader)), edited
    return Served(editable, weights=summed), edited


def other_questions_for(corrections: list[Correction]) -> list[OtherQuestion]:
    """The other questions `read_served` asks about the corrections' subjects; made before a run
    drops the subject field, they are the same questions with and without it."""
    return questions_about(corrections, load_relations(data_dir()), OTHER_PER_CORRECTION, OTHER_SEED)


def other_question_figures(served: Served, base: Served, corrections: list[Correction], questions: list[OtherQuestion],
                           tokens: int = TOKENS) -> tuple[float | None, float | None, list[dict]]:
    """other_leak and other_changed of `served` beside `base` over the questions about the given
    corrections (others are left out), and a row per question: the correction it is about, the
    question, the target, both answers and whether it leaked or changed."""
    target = {c.id: c.target_new for c in corrections}
    asked = [q for q in questions if q.correction_id in target]
    texts = [q.text for q in asked]
    rows = [{"correction": q.correction_id, "other": q.text, "target": target[q.correction_id], "base": b, "served": s,
             "leak": newly_says(s, b, target[q.correction_id]), "changed": first_words(s, 4) != first_words(b, 4)}
            for q, b, s in zip(asked, base.say(texts, tokens), served.say(texts, tokens))]
    return _share([r["leak"] for r in rows]), _share([r["changed"] for r in rows]), rows


def read_served(served: Served, corrections: list[Correction], subject: bool, tokens: int = TOKENS,
                samples: int = 8, questions: list[OtherQuestion] | None = None) -> ServedReport:
    """The generation figures of `served` over the corrections it carries; `questions`: the other
    questions about their subjects (default: `other_questions_for` the corrections)."""
    editable = served.editable
    base = Served(editable)
    prompts = [c.prompt for c in corrections]
    rephrases = [(c, r) for c in corrections for r in c.rephrases]
    neighbours = [(c, lp.prompt) for c in corrections for lp in c.locality_prompts]
    own = prompts + [r for _, r in rephrases]
    said, said_base = served.say(own, tokens), base.say(own, tokens)
    near, near_base = served.say([p for _, p in neighbours], tokens), base.say([p for _, p in neighbours], tokens)
    targets = [c.target_new for c in corrections] + [c.target_new for c, _ in rephrases]
    hits = [mentions(text, target) for text, target in zip(said, targets)]
    owners = corrections + [c for c, _ in rephrases]
    back = [goes_back(s, b, c.target_new, c.target_old) for s, b, c, hit in zip(said, said_base, owners, hits) if hit]
    kept = [first_words(a, 4) == first_words(b, 4) for a, b in zip(near, near_base)]
    leaks = [newly_says(a, b, c.target_new) for (c, _), a, b in zip(neighbours, near, near_base)]
    entropy_base = statistics.fmean(ngram_entropy(t) for t in said_base) if said_base else 0.0
    reliability, generalization = served.teacher_forced(corrections)
    chats = chat_answers_to(served, corrections, tokens)
    other_leak, other_changed, others = other_question_figures(
        served, base, corrections, other_questions_for(corrections) if questions is None else questions, tokens)
    return ServedReport(
        memory="routed" if served.memory is not None else "weights", subject=subject, n=len(corrections),
        reliability=reliability, generalization=generalization,
        gen_prompt=_share(hits[: len(prompts)]), gen_rephrase=_share(hits[len(prompts):]),
        nbhd_kept=_share(kept), nbhd_leak=_share(leaks), other_leak=other_leak, other_changed=other_changed,
        back_to_old=_share(back),
        fluency=statistics.fmean(ngram_entropy(t) for t in said) / entropy_base if entropy_base else None,
        repetition=_share([repeats(t) for t in said]), repetition_base=_share([repeats(t) for t in said_base]),
        chat_success=_share([mentions(a, c.target_new) for c, a in chats]),
        samples=tuple({"prompt": p, "target": c.target_new, "base": b, "served": s}
                      for p, c, b, s in zip(prompts, corrections, said_base, said))[:samples]
        + tuple({"went_back": t, "target": c.target_new, "old": c.target_old, "base": b, "served": s}
                for t, c, b, s in zip(own, owners, said_base, said) if goes_back(s, b, c.target_new, c.target_old))[:samples]
        + tuple({"neighbour": p, "target": c.target_new, "base": b, "served": s}
                for (c, p), b, s in zip(neighbours, near_base, near))[:samples]
        + tuple({"chat": c.prompt, "target": c.target_new, "served": a} for c, a in chats)[:samples]
        # the ones a person would dispute first: leaked, then changed
        + tuple(sorted(others, key=lambda r: (not r["leak"], not r["changed"])))[:samples],
    )


def chat_answers_to(served: Served, corrections: list[Correction], tokens: int) -> list[tuple[Correction, str]]:
    """The served model's chat answers to the corrections whose prompt is a question; none without
    a chat template."""
    questions = [c for c in corrections if is_question(c.prompt)]
    if not questions or not getattr(served.editable.tokenizer, "chat_template", None):
        return []
    return list(zip(questions, served.chat([c.prompt for c in questions], tokens)))


def _share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None
