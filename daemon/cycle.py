"""One decision: propose a delta for a batch of pending corrections, judge it, record it, act on it.

The order matters for the record: the MLflow run is written before anything is committed, so a
version never exists without the run that allowed it. If the tracking backend is down, the step
fails before changing anything and the corrections stay pending for the next cycle.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from daemon import tracking
from daemon.review import save_held
from daemon.runtime import Runtime
from daemon.versioning import commit_delta
from editors.formats import FormatError, from_record, to_record
from editors.types import Correction, apply_delta
from policies.gate import Decision
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


def enqueue(ledger, corrections: list[Correction], feed: str) -> list[tuple[LedgerCorrection, bool]]:
    """Store corrections as pending (once each: a repeat is recognised and not stored again)."""
    return [ledger.receive(feed, c.id, to_record(c), c.received_at) for c in corrections]


def decide(rt: Runtime, rows: list[LedgerCorrection]) -> StepResult:
    """Propose, judge, record and act on one batch of pending ledger rows."""
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
    edit_seconds = time.perf_counter() - started
    edited = [c for c in corrections if c.id in set(delta.correction_ids)]

    decision = run_id = version = None
    if edited:
        current = rt.editable.weights()
        candidate = {name: current[name] + change for name, change in delta.tensors().items()}
        started = time.perf_counter()
        decision = rt.gate.judge(current, candidate, edited, retained(rt))
        gate_seconds = time.perf_counter() - started
        record = tracking.DecisionRecord(
            decision, edited, rt.served, rt.editor.name, rt.policy, list(delta.holding), list(delta.invalid),
            len(rows), {"edit": edit_seconds, "gate": gate_seconds})
        run_id = tracking.open_decision_run(rt.records.mlflow, rt.records.experiment, record)

    for row, problem in unreadable:
        ledger.mark([row.key], CorrectionStatus.quarantined, run_id=run_id, reason=problem)
    for error in delta.invalid:
        ledger.mark([by_id[error.correction_id].key], CorrectionStatus.quarantined, run_id=run_id, reason=str(error))
    if delta.holding:
        ledger.mark([by_id[cid].key for cid in delta.holding], CorrectionStatus.applied, run_id=run_id,
                    reason=f"already answered as asked by {rt.served.tag}; no weight change")
    if decision is not None:
        version = _act(rt, decision, delta, run_id, [by_id[c.id].key for c in edited])
    return StepResult(decision, run_id, version, [c.id for c in edited], list(delta.holding),
                      [e.correction_id for e in delta.invalid] + [row.external_id for row, _ in unreadable])


def _act(rt: Runtime, decision: Decision, delta, run_id: str, keys: list[int]) -> Version | None:
    ledger = rt.records.versions.ledger
    client = rt.records.mlflow
    try:
        if decision.outcome == "accepted":
            version = commit_delta(rt.records.versions, delta, run_id=run_id, figures=decision.metrics)
            apply_delta(rt.loaded.model, delta)  # the prefix cache stays valid: only edited layers change
            rt.served = version
            tracking.close_decision_run(client, run_id, version)
            return version
        if decision.outcome == "held":
            save_held(rt.home, run_id, delta)
            ledger.mark(keys, CorrectionStatus.held, run_id=run_id, reason=decision.summary())
        else:
            ledger.mark(keys, CorrectionStatus.rejected, run_id=run_id, reason=decision.summary())
        tracking.close_decision_run(client, run_id, None)
        return None
    except Exception as error:
        tracking.close_decision_run(client, run_id, None, failed=f"{type(error).__name__}: {error}")
        raise


def retained(rt: Runtime) -> list[Correction]:
    """The corrections the served weights carry (applied at some version): the retention suite."""
    rows = rt.records.versions.ledger.corrections(CorrectionStatus.applied)
    return [from_record(row.external_id, row.payload, row.feed) for row in rows if row.version is not None]
