"""The gate: may this candidate change be committed?

It compares the current weights with the candidate weights (both for the editable tensors only,
or, with a routed memory, the current memory and the memory plus the new entries: each prompt is
judged as the entry it routes to will serve it) on four questions: do the new corrections hold (reliability, generalization), do the earlier ones
still hold (retention), are unrelated answers unchanged from the base model (locality), and did
perplexity move (ppl_drawdown). Each measure is checked against the policy: all accept thresholds
met -> accepted; all hold thresholds met -> held for a person; otherwise rejected, with the failing
checks spelt out. With the optional generation checks in the policy (repetition, leaks,
other_leak) it also reads greedy answers: a candidate whose answers run away, spill onto neighbours,
or answer other questions about a corrected subject with the correction ("Isaac Newton studied at ->
Rome" beside "Isaac Newton was born in -> Rome", issue #35) is stopped even when every teacher-forced
figure passes.

Everything runs through the Editable, so the suites' prefix states are computed once and each gate
runs only the edited layers and the head.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from editors import scoring
from editors.batching import TokenBatch, rows_of, text_batch
from editors.editable import Editable
from editors.reading import first_words, newly_says, repeats
from editors.routing import NONE, Routed
from editors.serving import serving_entries
from editors.types import Correction
from policies.policy import Policy, Threshold
from policies.served_eval import Served, answered_as, other_question_figures, other_questions_for, routed_alike
from policies.suites import BATCH, Probe, RetentionProbe, Suites, retention_probes

SPOKEN = 12  # tokens of each answer the generation checks read
# Other questions whose base answers a gate keeps, ~2,000 corrections' worth: a question is asked
# again only when its batch is split or a held decision is judged again
PINNED = 4096
Outcome = Literal["accepted", "held", "rejected"]
Weights = dict[str, torch.Tensor] | Routed  # replacement weights, or a routed memory on the model's own


@dataclass(frozen=True)
class Check:
    name: str
    value: float | None  # None: nothing to measure (e.g. no rephrasings in the batch)
    n: int  # how many prompts (or tokens, for perplexity) the value rests on
    threshold: Threshold
    outcome: Literal["pass", "hold", "fail", "skipped"]

    def words(self) -> str:
        t = self.threshold
        if self.outcome == "skipped":
            return f"{self.name}: not measured (nothing to measure)"
        bound = "at least" if t.higher_is_better else "at most"
        verdict = {"pass": "passes", "hold": "misses the accept threshold but is within the hold band",
                   "fail": "fails"}[self.outcome]
        return (f"{self.name} {self.value:.4f} {verdict} (accept {bound} {t.accept}, hold {bound} {t.hold}; "
                f"n={self.n})")


@dataclass(frozen=True)
class Example:
    """One row of the per-example table a reviewer reads."""

    kind: str  # edit | rephrase | retention | locality | answer, leak, other (generated)
    correction_id: str
    prompt: str
    target: str
    before: str  # the argmax answer before the change (teacher-forced, token by token)
    after: str
    passed: bool


@dataclass(frozen=True)
class Speech:
    """The generation checks' figures (name -> value, n) and the answers a reviewer reads."""

    figures: dict[str, tuple[float | None, int]]
    examples: tuple["Example", ...]
    measured: dict[str, float] = field(default_factory=dict)  # figures with no threshold: for the record only


# The checks whose failing examples name their correction; the others (locality, perplexity,
# retention) measure the change as a whole.
BLAMES = {"reliability": "edit", "generalization": "rephrase", "repetition": "answer", "leaks": "leak",
          "other_leak": "other"}


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    checks: tuple[Check, ...]
    examples: tuple[Example, ...]
    measured: dict[str, float] = field(default_factory=dict)  # figures beside the checks, no threshold of their own

    @property
    def suspects(self) -> frozenset[str]:
        """The corrections whose own examples failed, when every check that stopped an accept names
        its culprits that way; empty when one of them measures the change as a whole."""
        stopping = {c.name for c in self.checks if c.outcome in ("hold", "fail")}
        if not stopping or not stopping <= BLAMES.keys():
            return frozenset()
        kinds = {BLAMES[name] for name in stopping}
        return frozenset(e.correction_id for e in self.examples if e.kind in kinds and not e.passed)

    @property
    def metrics(self) -> dict[str, float]:
        """The checks' values and the figures measured beside them: the MLflow run's metrics and the
        version's figures."""
        return {**{c.name: c.value for c in self.checks if c.value is not None}, **self.measured}

    @property
    def reasons(self) -> list[str]:
        """The checks that stopped an accept, in words; empty when accepted."""
        return [c.words() for c in self.checks if c.outcome in ("hold", "fail")]

    def summary(self) -> str:
        if self.outcome == "accepted":
            return "accepted: every check passes"
        return f"{self.outcome}: " + "; ".join(self.reasons)


def decide(checks: list[Check]) -> Outcome:
    outcomes = {c.outcome for c in checks}
    if "fail" in outcomes:
        return "rejected"
    return "held" if "hold" in outcomes else "accepted"


def share(values: torch.Tensor) -> float:
    """The mean of per-prompt values in float64: 9 of 10 is exactly the 0.9 a policy writes (in
    float32 it is 0.89999998, which misses an accept threshold of 0.9)."""
    return values.double().mean().item()


def runaways(targets: list[str], before: list[str], after: list[str]) -> list[bool]:
    """Answers that say a word pair 3+ times where the served model's answer to the same prompt did
    not, and every answer to a correction whose target itself does ("banana banana banana")."""
    return [repeats(t) or (repeats(a) and not repeats(b)) for t, b, a in zip(targets, before, after)]


def worst_share(owners: list[str], flags: list[bool]) -> float:
    """The largest share of flagged answers among any one owner's (correction's): one degenerate
    target fails its batch, which the cycle then splits until it stands alone."""
    per_owner: dict[str, list[bool]] = {}
    for owner, flag in zip(owners, flags):
        per_owner.setdefault(owner, []).append(flag)
    return max(sum(v) / len(v) for v in per_owner.values())


def leaks(targets: list[str], before: list[str], after: list[str]) -> list[bool]:
    """Answers to prompts that are not a correction's own that changed: other opening words, or
    the correction's target said where it was not before."""
    return [first_words(a) != first_words(b) or newly_says(a, b, t)
            for t, b, a in zip(targets, before, after)]


def check(name: str, value: float | None, n: int, threshold: Threshold) -> Check:
    if value is None:
        return Check(name, None, n, threshold, "skipped")
    meets = (lambda bound: value >= bound) if threshold.higher_is_better else (lambda bound: value <= bound)
    outcome = "pass" if meets(threshold.accept) else "hold" if meets(threshold.hold) else "fail"
    return Check(name, value, n, threshold, outcome)


class PinnedAnswers:
    """`base`'s answers, each generated once, when its prompt is first asked, and kept (the latest
    `limit` prompts; None: all). The gate's base is the model's own weights with no memory, which a
    routed memory never changes: a candidate's answers to other questions are compared with the base
    model's, never with ones re-read from a served model that has drifted since."""

    def __init__(self, base: Served, limit: int | None = PINNED):
        self.base = base
        self.limit = limit
        self._kept: dict[tuple[int, str], str] = {}  # (tokens, prompt) -> answer, oldest first

    def say(self, prompts: list[str], tokens: int = SPOKEN) -> list[str]:
        new = list(dict.fromkeys(p for p in prompts if (tokens, p) not in self._kept))
        for prompt, answer in zip(new, self.base.say(new, tokens)):
            self._kept[(tokens, prompt)] = answer
        answers = [self._kept[(tokens, p)] for p in prompts]
        if self.limit is not None:
            for stale in list(self._kept)[: max(0, len(self._kept) - self.limit)]:
                del self._kept[stale]
        return answers


def answered_by_base(served: Served, base: Served, prompts: list[str]) -> list[bool]:
    """Per prompt, whether `served` answers it as `base` does without being asked: `base` is the
    weights alone and `served` a routed memory over the same weights that routes it to no entry."""
    if not prompts or served.memory is None or base.memory is not None or served.weights is not base.weights:
        return [False] * len(prompts)
    return [j == NONE for j in serving_entries(served.editable, prompts, served.memory)]


@dataclass(frozen=True)
class ReusingBase:
    """`served`'s answers, taking `pinned`'s where `served` answers as their base does
    (`answered_by_base`): once routing reads what a query asks, most other questions about a
    corrected subject reach no entry, and cost the candidate nothing."""

    served: Served
    pinned: PinnedAnswers

    def say(self, prompts: list[str], tokens: int = SPOKEN) -> list[str]:
        alike = answered_by_base(self.served, self.pinned.base, prompts)
        reused = iter(self.pinned.say([p for p, same in zip(prompts, alike) if same], tokens))
        return answered_as(self.served, prompts, [next(reused) if same else "" for same in alike], alike, tokens)


class Gate:
    """The pinned suites made ready to run: tokenized once, sorted by length, references as tensors."""

    def __init__(self, editable: Editable, suites: Suites, policy: Policy):
        self.editable = editable
        self.suites = suites
        self.policy = policy
        ordered = sorted(suites.locality, key=lambda p: len(p.prompt) + len(p.answer))
        self.locality_batches: list[tuple[list[Probe], TokenBatch, torch.Tensor]] = []
        for start in range(0, len(ordered), BATCH):
            probes = ordered[start : start + BATCH]
            batch = editable.batch([(p.prompt, p.answer) for p in probes])
            reference = torch.tensor([token for p in probes for token in p.reference])
            self.locality_batches.append((probes, batch, reference))
        self.text = text_batch(suites.perplexity.chunks)
        self.pinned = PinnedAnswers(Served(editable))  # base answers to other questions about corrected subjects

    def judge(self, current: Weights, candidate: Weights, corrections: list[Correction],
              retained: list[Correction] = ()) -> Decision:
        """Decide on `candidate` (the current weights plus the corrections' delta)."""
        with torch.no_grad():
            edits, edit_rows = self._new_edits(current, candidate, corrections)
            retention, retention_rows = self._retention(current, candidate, retention_probes(list(retained)))
            locality, locality_rows = self.locality(candidate)
            ppl = self.ppl_drawdown(candidate)
            speech = self._speech(current, candidate, corrections)
        p = self.policy.threshold
        checks = [
            check("reliability", edits["reliability"], len(corrections), p("reliability")),
            check("generalization", edits["generalization"], edits["n_rephrases"], p("generalization")),
            check("locality", locality, len(self.suites.locality), p("locality")),
            check("retention", retention[0], retention[1], p("retention")),
            check("ppl_drawdown", ppl, int(self.text.answer_labels.numel()), p("ppl_drawdown")),
            *(check(name, value, n, p(name)) for name, (value, n) in speech.figures.items()),
        ]
        return Decision(decide(checks), tuple(checks),
                        tuple(edit_rows + retention_rows + locality_rows + list(speech.examples)), speech.measured)

    # -- measures -----------------------------------------------------------------------------

    def _speech(self, current: Weights, candidate: Weights, corrections: list[Correction]) -> "Speech":
        """The generation checks the policy has: repetition (of the answers to each correction's own
        prompts and rephrasings, the share that runs away where the served model's did not; the
        worst correction's), leaks (the share of prompts that reach the change without being a
        correction's own whose answer changes) and other_leak (`_other_questions`)."""
        wanted = [name for name in ("repetition", "leaks", "other_leak") if self.policy.checks(name)]
        if not wanted or not corrections:
            return Speech({}, ())
        now, then = Served.of(self.editable, current), Served.of(self.editable, candidate)
        figures: dict[str, tuple[float | None, int]] = {}
        examples: list[Example] = []
        if "repetition" in wanted:
            own = [(c, c.prompt) for c in corrections] + [(c, r) for c in corrections for r in c.rephrases]
            prompts = [p for _, p in own]
            before = now.say(prompts, SPOKEN)
            after = answered_as(then, prompts, before, routed_alike(now, then, prompts), SPOKEN)
            runaway = runaways([c.target_new for c, _ in own], before, after)
            figures["repetition"] = (worst_share([c.id for c, _ in own], runaway), len(own))
            examples += [Example("answer", c.id, prompt, c.target_new, b, a, not bad)
                         for (c, prompt), b, a, bad in zip(own, before, after, runaway)]
        if "leaks" in wanted:
            near = [(c, lp.prompt) for c in corrections for lp in c.locality_prompts] + self._routed_to_new(current, candidate, corrections)
            # a prompt both models answer alike cannot leak: only the others are generated
            changed = [pair for pair, same in zip(near, routed_alike(now, then, [p for _, p in near])) if not same]
            before, after = now.say([p for _, p in changed], SPOKEN), then.say([p for _, p in changed], SPOKEN)
            leaked = leaks([c.target_new for c, _ in changed], before, after)
            figures["leaks"] = (sum(leaked) / len(near) if near else None, len(near))
            examples += [Example("leak", c.id, prompt, c.target_new, b, a, False)
                         for (c, prompt), b, a, bad in zip(changed, before, after, leaked) if bad]
        measured: dict[str, float] = {}
        if "other_leak" in wanted:
            other = self._other_questions(then, corrections)
            figures.update(other.figures)
            examples += other.examples
            measured.update(other.measured)
        return Speech(figures, tuple(examples), measured)

    def _other_questions(self, then: Served, corrections: list[Correction]) -> Speech:
        """other_leak: of other questions about the corrections' subjects (`other_questions_for`, as
        `mendd eval --served` asks them: two a correction, of other relations of its subject's kind),
        the share whose candidate answer says its correction's target where the base model's did not,
        as neighbourhood leaks are judged (over the batch); None when no correction's relation is
        known. other_changed (their first 4 words differ from the base's) goes on the record beside it.
        Each question's row is in the table, a leaked one failed under its correction's id."""
        leak, changed, rows = other_question_figures(ReusingBase(then, self.pinned), self.pinned, corrections,
                                                     other_questions_for(corrections), SPOKEN)
        examples = tuple(Example("other", r["correction"], r["other"], r["target"], r["base"], r["served"], not r["leak"])
                         for r in rows)
        return Speech({"other_leak": (leak, len(rows))}, examples, {"other_changed": changed} if changed is not None else {})

    def _routed_to_new(self, current: Weights, candidate: Weights, corrections: list[Correction]) -> list[tuple[Correction, str]]:
        """The locality suite's prompts that the candidate routes to one of the new entries (routed
        on the states the locality check has read already: a prompt's states do not depend on the
        answer after it)."""
        if not isinstance(candidate, Routed):
            return []
        known = len(current.memory.entries) if isinstance(current, Routed) else 0
        by_id = {c.id: c for c in corrections}
        entries = candidate.memory.entries
        return [(by_id[entries[j].correction_id], probe.prompt)
                for probes, batch, _ in self.locality_batches
                for probe, j in zip(probes, self.editable.routes(batch, candidate.memory).tolist())
                if j >= known and entries[j].correction_id in by_id]

    def _new_edits(self, current: Weights, candidate: Weights, corrections: list[Correction]):
        rows: list[Example] = []
        scores: dict[str, float | None] = {}
        for kind, pairs in (("edit", [(c, c.prompt) for c in corrections]),
                            ("rephrase", [(c, r) for c in corrections for r in c.rephrases])):
            if not pairs:
                scores[kind] = None
                continue
            _, accuracy, examples = self._targets(current, candidate, [(c.id, prompt, c.target_new) for c, prompt in pairs], kind)
            scores[kind] = share(accuracy)
            rows.extend(examples)
        n_rephrases = sum(len(c.rephrases) for c in corrections)
        return {"reliability": scores["edit"], "generalization": scores["rephrase"], "n_rephrases": n_rephrases}, rows

    def _retention(self, current: Weights, candidate: Weights, probes: list[RetentionProbe]):
        """Of the earlier corrections' prompts that hold now, the share that still hold."""
        if not probes:
            return (None, 0), []
        before, after, examples = self._targets(current, candidate, [(p.correction_id, p.prompt, p.target) for p in probes], "retention")
        held_before = before >= 1.0
        if not held_before.any():
            return (None, 0), []
        kept = share((after[held_before] >= 1.0).float())
        lost = [e for e, was in zip(examples, held_before.tolist()) if was and not e.passed]
        return (kept, int(held_before.sum())), lost

    def _targets(self, current: Weights, candidate: Weights, triples: list[tuple[str, str, str]], kind: str):
        """Accuracy of each (id, prompt, target) before and after, and a table row for each."""
        batch = self.editable.batch([(prompt, target) for _, prompt, target in triples])
        rows, n = batch.row_of_answer, len(triples)
        before_logits = self.editable.logits(batch, current)
        after_logits = self.editable.logits(batch, candidate)
        before = scoring.accuracy(before_logits, batch.answer_labels, rows, n)
        after = scoring.accuracy(after_logits, batch.answer_labels, rows, n)
        guess_before, guess_after = before_logits.argmax(-1), after_logits.argmax(-1)
        examples = [Example(kind, cid, prompt, target, self._decode(guess_before[rows == i]),
                            self._decode(guess_after[rows == i]), bool(after[i] >= 1.0))
                    for i, (cid, prompt, target) in enumerate(triples)]
        return before, after, examples

    def locality(self, candidate: Weights):
        """Mean per-probe agreement with the base model's argmax; the changed probes as table rows.
        With a routed memory on the model's own weights, a probe that no entry serves is answered
        by the base weights, whose answers the reference is: only the routed probes are run."""
        agreements: list[torch.Tensor] = []
        rows: list[Example] = []
        for probes, batch, reference in self.locality_batches:
            same = torch.ones(len(probes))
            run = self._reachable(batch, candidate)
            if run:
                part = rows_of(batch, run)
                after = self.editable.logits(part, candidate).argmax(-1)
                wanted = reference[torch.isin(batch.row_of_answer, torch.tensor(run))]
                same[run] = scoring.per_row_mean((after == wanted).float(), part.row_of_answer, len(run))
                for i in (same[run] < 1.0).nonzero()[:, 0].tolist():
                    probe = probes[run[i]]
                    mine = part.row_of_answer == i
                    rows.append(Example("locality", "", probe.prompt, probe.answer, self._decode(wanted[mine]),
                                        self._decode(after[mine]), False))
            agreements.append(same)
        return share(torch.cat(agreements)), rows

    def _reachable(self, batch: TokenBatch, weights: Weights) -> list[int]:
        """The rows of `batch` whose answers `weights` may change: every row, or with a routed
        memory on the model's own weights, the rows some entry serves."""
        if not isinstance(weights, Routed) or weights.weights is not None:
            return list(range(len(batch.lengths)))
        return (self.editable.routes(batch, weights.memory) != NONE).nonzero()[:, 0].tolist()

    def text_routed(self, candidate: Weights) -> float | None:
        """The share of the perplexity sample's chunks (running text, each routed as one query) that
        some entry of a routed memory serves; None for weights."""
        if not isinstance(candidate, Routed):
            return None
        return share((self.editable.routes(self.text, candidate.memory) != NONE).float())

    def ppl_drawdown(self, candidate: Weights) -> float:
        logits = self.editable.logits(self.text, candidate)
        nll = scoring.token_nll(logits, self.text.answer_labels).mean().item()
        return scoring.perplexity_change(nll, self.suites.perplexity.base_nll)

    def _decode(self, tokens: torch.Tensor) -> str:
        return self.editable.tokenizer.decode(tokens.tolist())
