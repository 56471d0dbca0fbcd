"""One decision: propose a delta for a batch of pending corrections, judge it, record it, act on it.
An operator's revert is decided the same way (:func:`decide_revert`), and a held delta approved after
the head moved is judged again on the head (:func:`rejudge_on_head`).

The order matters for the record: the MLflow run is written before anything is committed, so a
version never exists without the run that allowed it. If the tracking backend is down, the step
fails before changing anything and the corrections stay pending for the next cycle.
"""
from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass, replace

import torch

from daemon import tracking
from daemon.commits import commit_change, commit_delta, commit_entries, revert_change
from daemon.review import Rejudge, save_held
from daemon.runtime import Runtime, ledger_corrections
from daemon.stored_form import memory_chunk
from editors.formats import FormatError, from_record
from editors.routing import Routed
from editors.types import Correction, apply_delta
from policies.gate import Decision
from policies.suites import Carried, retention_sample
from store.crash import JUDGED, PROPOSED, TRACKED, crash_point
from store.ledger import LedgerCorrection
from store.ledger_schema import CorrectionStatus
from store.versions import Version


@dataclass(frozen=True)
class StepResult:
    decision: Decision | None  # None when nothing in the batch needed an edit
    run_id: str | None
    version: Version | None  # the new version, when accepted
    edited: list[str]  # correction ids the decision was about
    holding: list[str]
    invalid: list[str]
    seconds: dict[str, float]  # edit, gate, tracking, commit: where the time went


def decide(rt: Runtime, rows: list[LedgerCorrection], final: bool = True) -> StepResult:
    """Propose, judge, record and act on one batch of pending ledger rows.

    When not `final`, a rejected or held batch's corrections stay pending: the cycle retries them in
    halves.
    """
    ledger = rt.records.versions.ledger
    by_id = {row.external_id: row for row in rows}
    corrections, unreadable = [], []
    for row in rows:
        try:
            corrections.append(from_record(row.external_id, row.payload, row.feed))
        except FormatError as error:
            unreadable.append((row, str(error)))
    started = time.perf_counter()
    delta = rt.editor.propose(rt.editable, corrections)
    seconds = {"edit": time.perf_counter() - started}  # where the time went: edit, gate, tracking, commit
    crash_point(PROPOSED)
    edited = [c for c in corrections if c.id in set(delta.correction_ids)]

    decision = run_id = version = None
    if edited:
        started = time.perf_counter()
        decision = _judge(rt, delta, edited)
        seconds["gate"] = time.perf_counter() - started
        crash_point(JUDGED)
        record = tracking.DecisionRecord(
            decision, edited, rt.served, rt.editor.name, rt.policy, list(delta.holding), list(delta.invalid),
            len(rows), dict(seconds))
        started = time.perf_counter()
        run_id = tracking.open_decision_run(rt.records.mlflow, rt.records.experiment, record)
        seconds["tracking"] = time.perf_counter() - started
        crash_point(TRACKED)

    for row, problem in unreadable:
        ledger.mark([row.key], CorrectionStatus.quarantined, run_id=run_id, reason=problem)
    for error in delta.invalid:
        ledger.mark([by_id[error.correction_id].key], CorrectionStatus.quarantined, run_id=run_id, reason=str(error))
    if delta.holding:
        ledger.mark([by_id[cid].key for cid in delta.holding], CorrectionStatus.applied, run_id=run_id,
                    reason=f"already answered as asked by {rt.served.tag}; no weight change")
    if decision is not None:
        started = time.perf_counter()
        version = _act(rt, decision, delta, edited, run_id, [by_id[c.id].key for c in edited], final)
        seconds["commit"] = time.perf_counter() - started
    return StepResult(decision, run_id, version, [c.id for c in edited], list(delta.holding),
                      [e.correction_id for e in delta.invalid] + [row.external_id for row, _ in unreadable], seconds)


def _act(rt: Runtime, decision: Decision, delta, corrections: list[Correction], run_id: str, keys: list[int],
         final: bool) -> Version | None:
    ledger = rt.records.versions.ledger
    client = rt.records.mlflow
    try:
        if decision.outcome == "accepted":
            if rt.memory is not None:
                entries = rt.entries(delta, corrections)
                version = commit_entries(rt.records.versions, rt.memory, entries, run_id=run_id, figures=decision.metrics)
                rt.memory = rt.memory.plus(entries)
            else:
                version = commit_delta(rt.records.versions, delta, run_id=run_id, figures=decision.metrics)
                apply_delta(rt.loaded.model, delta)  # the prefix cache stays valid: only edited layers change
                rt.editable.weights_changed()
            rt.served = version
            tracking.close_decision_run(client, run_id, version)
            return version
        if final and decision.outcome == "held":
            routed = memory_chunk(rt.memory, rt.entries(delta, corrections)) if rt.memory is not None else None
            save_held(rt.home, run_id, delta, routed)
            ledger.mark(keys, CorrectionStatus.held, run_id=run_id, reason=decision.summary())
        elif final:
            ledger.mark(keys, CorrectionStatus.rejected, run_id=run_id, reason=decision.summary())
        elif decision.outcome == "held":
            tracking.mark_split(client, run_id)
        tracking.close_decision_run(client, run_id, None)
        return None
    except Exception as error:
        tracking.close_decision_run(client, run_id, None, failed=f"{type(error).__name__}: {error}")
        raise


def _judge(rt: Runtime, delta, corrections: list[Correction]) -> Decision:
    return rt.gate.judge(rt.served_weights(), rt.with_delta(delta, corrections), corrections, retained(rt, corrections))


def rejudge_on_head(rt: Runtime) -> Rejudge:
    """Judge a held delta on the store's head, as a new decision would be judged there."""
    def judge(delta, corrections: list[Correction]) -> Decision:
        head = rt.records.versions.store.head()
        if rt.served.tag != head.tag:
            rt.load(head)
        return _judge(rt, delta, corrections)
    return judge


def retained(rt: Runtime, new: list[Correction]) -> list[Correction]:
    """The retention suite of a decision on `new`: a bounded sample of the corrections the served
    weights carry (applied at some version; policies/suites.retention_sample). Only the sample is
    read back as corrections: the cost of a decision stays flat as the applied ones grow."""
    carried = rt.records.versions.ledger.carried_records()
    records = {external_id: (feed, record) for external_id, feed, record in carried}
    sample = retention_sample([Carried.of_record(external_id, record) for external_id, _, record in carried],
                              new, rt.config.cycle.retention_recent, rt.config.cycle.retention_older)
    return [from_record(c.id, records[c.id][1], records[c.id][0]) for c in sample]


@dataclass(frozen=True)
class RevertResult:
    decision: Decision
    run_id: str
    version: Version | None  # the new version, when accepted or forced
    corrections: tuple[str, ...]  # what the version takes out (a fine-tuning share goes whole)


def decide_revert(rt: Runtime, correction_id: str, force: bool = False) -> RevertResult:
    """Judge the weights without one correction's change as any change is judged (the others must
    still hold, unrelated answers and perplexity must stay in bounds), record the decision in MLflow,
    and commit it if the gate accepts it, or if an operator forces it."""
    versions = rt.records.versions
    change = revert_change(versions, correction_id, reason=f"mendd revert {correction_id}")
    taken_out = set(change.corrections)
    current = rt.served_weights()
    weights = {**rt.editable.weights(), **change.tensors}
    candidate = Routed(rt.memory.without(taken_out), weights) if rt.memory is not None else weights
    reverted = ledger_corrections([versions.ledger.correction(cid) for cid in change.corrections])
    started = time.perf_counter()
    kept = [c for c in retained(rt, reverted) if c.id not in taken_out]
    decision = rt.gate.judge(current, candidate, [], kept)
    seconds = {"gate": time.perf_counter() - started}
    record = tracking.DecisionRecord(decision, reverted, rt.served, rt.editor.name, rt.policy, [], [], len(reverted),
                                     seconds, action="revert")
    run_id = tracking.open_decision_run(rt.records.mlflow, rt.records.experiment, record)
    version = None
    try:
        if decision.outcome == "accepted" or force:
            reason = change.reason if decision.outcome == "accepted" else f"{change.reason} --force over a {decision.outcome} decision"
            version = commit_change(versions, replace(change, run_id=run_id, figures=decision.metrics, reason=reason))
            params = dict(rt.loaded.model.named_parameters())
            with torch.no_grad():
                for name, value in change.tensors.items():
                    params[name].copy_(value)
            rt.editable.weights_changed()
            if rt.memory is not None:
                rt.memory = rt.memory.without(taken_out)
            rt.served = version
    except Exception as error:
        tracking.close_decision_run(rt.records.mlflow, run_id, None, failed=f"{type(error).__name__}: {error}")
        raise
    tracking.close_decision_run(rt.records.mlflow, run_id, version)
    return RevertResult(decision, run_id, version, change.corrections)


@dataclass(frozen=True)
class CycleReport:
    cycle_id: int
    outcome: str  # idle | accepted | held | rejected | mixed | failed
    steps: list[StepResult]
    superseded: list[str]
    version: str | None  # the served version at the end

    def as_dict(self) -> dict:
        return {"cycle": self.cycle_id, "outcome": self.outcome, "version": self.version,
                "superseded": self.superseded,
                "decisions": [{"run_id": s.run_id, "outcome": s.decision.outcome if s.decision else None,
                               "corrections": s.edited, "holding": s.holding, "invalid": s.invalid,
                               "version": s.version.tag if s.version else None,
                               "reasons": s.decision.reasons if s.decision else []} for s in self.steps]}


def run_cycle(rt: Runtime, should_stop=lambda: False) -> CycleReport:
    """Take up to batch_size pending corrections, oldest first, and decide on them.

    Contradictions in the batch (same prompt, different targets) keep the newest. A rejected or held
    batch is decided again in parts (`split`: the corrections the gate named apart, else halves),
    down to single corrections, so one bad correction does not keep the others out, and a reviewer
    is asked about the one that needs it (one leaking answer of eleven held a whole batch of ten).
    """
    ledger = rt.records.versions.ledger
    cycle_id = ledger.start_cycle()
    try:
        rows, superseded = supersede(ledger, ledger.pending(rt.config.batch_size))
        steps: list[StepResult] = []
        queue = [rows] if rows else []
        while queue and not should_stop():  # stopping: what is not decided yet stays pending
            part = queue.pop(0)
            step = decide(rt, part, final=len(part) == 1)
            steps.append(step)
            give_back_freed_memory()
            if step.decision is not None and step.decision.outcome in ("rejected", "held") and len(part) > 1:
                retry = [row for row in part if row.external_id in step.edited]
                queue[:0] = split(retry, step.decision.suspects)
    except Exception as error:
        ledger.finish_cycle(cycle_id, "failed", detail=f"{type(error).__name__}: {error}")
        raise
    outcome = _outcome(steps)
    ledger.finish_cycle(cycle_id, outcome, version=rt.served.tag, run_ids=[s.run_id for s in steps if s.run_id],
                        detail=f"{sum(len(s.edited) for s in steps)} judged, {len(superseded)} superseded")
    return CycleReport(cycle_id, outcome, steps, superseded, rt.served.tag)


# glibc's malloc_trim, absent from other C libraries (musl, macOS)
_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)


def give_back_freed_memory() -> None:
    """Return the heap's free pages to the system. A decision allocates and frees gigabytes of
    tensors of many sizes through malloc; the pages freed between chunks still in use stay resident
    otherwise, and the service's resident memory grew with its history (~4 GB at T = 10,000,
    bench/results/README.md)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def split(rows: list[LedgerCorrection], suspects: frozenset[str]) -> list[list[LedgerCorrection]]:
    """How a rejected or held batch is decided again: the corrections the gate named (a leaking or
    runaway answer, an edit that did not land) apart from the rest, when it named some but not all;
    else in halves."""
    named = [row for row in rows if row.external_id in suspects]
    if 0 < len(named) < len(rows):
        return [named, [row for row in rows if row.external_id not in suspects]]
    half = len(rows) // 2
    return [chunk for chunk in (rows[:half], rows[half:]) if chunk]


def supersede(ledger, rows: list[LedgerCorrection]) -> tuple[list[LedgerCorrection], list[str]]:
    """Of corrections with the same prompt and different targets, keep the newest; mark the rest superseded."""
    newest: dict[str, LedgerCorrection] = {}
    for row in rows:  # oldest first, so a later row replaces an earlier one
        newest[_prompt_key(row)] = row
    keep = {row.key for row in newest.values()}
    dropped = [row for row in rows if row.key not in keep]
    for row in dropped:
        winner = newest[_prompt_key(row)]
        ledger.mark([row.key], CorrectionStatus.superseded,
                    reason=f"superseded by {winner.external_id} (same prompt, newer target {winner.payload.get('target_new')!r})")
    return [row for row in rows if row.key in keep], [row.external_id for row in dropped]


def _prompt_key(row: LedgerCorrection) -> str:
    return " ".join(str(row.payload.get("prompt", "")).split()).lower()


def _outcome(steps: list[StepResult]) -> str:
    outcomes = {s.decision.outcome for s in steps if s.decision is not None}
    if not outcomes:
        return "idle" if not steps else "no-edit"
    return outcomes.pop() if len(outcomes) == 1 else "mixed"
