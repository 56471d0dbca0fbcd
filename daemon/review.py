"""Held decisions: their candidate deltas wait in the home until a person settles them.

A person approves or rejects with `mendd review approve|reject RUN_ID`, or by setting the tag
`mendd.review` to `approve`/`reject` on the run in the MLflow UI; :func:`settle_tagged` acts on
those tags (the service calls it on every tick). Approving commits the held delta on top of the
current head (deltas add, so later versions keep their corrections).

A held decision's figures describe its delta on the version it was judged on. When the head has
moved since, those figures no longer describe what approval would commit, so the delta is judged
again on the head first (the figures are logged on the held run as `rejudged.*`); a person's
approval overrides a hold, never a rejection.

Settling can stop anywhere (a crash, MLflow down): approving again finds the version already
committed for the run and only finishes settling it, so nothing is committed twice. A run whose
held candidate file has gone cannot be approved: it is settled as unusable and its corrections
rejected, with the reason, so they can be submitted again.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

from daemon import tracking
from daemon.commits import commit_chunk, commit_delta
from daemon.health import describe_failure
from daemon.home import Home
from daemon.runtime import Records, ledger_corrections
from daemon.stored_form import is_routed, share_from_stored, share_to_stored
from daemon.versioning import Versions, sync_ledger
from editors.types import Correction, Delta
from policies.gate import Decision
from store.crash import APPROVAL_COMMITTED, HELD_SAVED, crash_point
from store.errors import StoreError
from store.ledger import LedgerCorrection
from store.ledger_schema import CorrectionStatus
from store.versions import MemoryChunk, Version, read_memory_chunk, read_shares, write_shares


class ReviewError(StoreError):
    """A review that cannot be carried out; nothing was changed."""


class StaleReview(ReviewError):
    """The head moved since the decision was judged, and nothing was given to judge it again with."""


class RejectedOnHead(ReviewError):
    """Judged again on the moved head, the held delta is rejected: approval cannot override that."""


class UnusableReview(ReviewError):
    """The held candidate file is gone, or its corrections were decided again (ABANDONED): the run
    was settled as unusable, and the corrections it still held rejected."""


MISSING_CANDIDATE = "held candidate file missing; submit the corrections again"
ABANDONED = ("the service stopped before this run's corrections were recorded as held; they were decided again "
             "by a later run")

# judges a held delta and its corrections on the current head: the service's gate, model loaded
Rejudge = Callable[[Delta, list[Correction]], Decision]


@dataclass(frozen=True)
class HeldDecision:
    run_id: str
    started: datetime
    base_version: str
    corrections: str
    reasons: str
    review: str | None  # the reviewer's tag, if set but not yet acted on
    note: str | None  # why an earlier approval was refused

    def as_dict(self) -> dict:
        return {**self.__dict__, "started": self.started.isoformat()}


def save_held(home: Home, run_id: str, delta: Delta, routed: MemoryChunk | None = None) -> None:
    """Keep a held candidate's shares (low-rank factors, or dense for fine-tuning) until review; a
    routed candidate's as the memory chunk approval commits."""
    home.held_dir.mkdir(parents=True, exist_ok=True)
    chunk = routed or MemoryChunk(tuple(share_to_stored(share) for share in delta.shares))
    write_shares(held_path(home, run_id), chunk.shares, {**chunk.metadata, "editor": delta.editor}, chunk.common)
    crash_point(HELD_SAVED)


def load_held(home: Home, run_id: str) -> Delta:
    stored, metadata = read_shares(held_path(home, run_id))
    return Delta(editor=metadata["editor"], shares=[share_from_stored(share) for share in stored])


def held_path(home: Home, run_id: str) -> Path:
    return home.held_dir / f"{run_id}.safetensors"


def held(records: Records) -> list[HeldDecision]:
    out = []
    for run in tracking.held_runs(records.mlflow, records.experiment):
        tags = run.data.tags
        out.append(HeldDecision(
            run.info.run_id, datetime.fromtimestamp(run.info.start_time / 1000, timezone.utc),
            tags.get(tracking.BASE_VERSION_TAG, "?"), tags.get(tracking.CORRECTIONS_TAG, ""),
            tags.get(tracking.REASONS_TAG, ""), tags.get(tracking.REVIEW_TAG), tags.get(tracking.REVIEW_NOTE_TAG)))
    return out


class Settled(NamedTuple):
    """What :func:`settle_tagged` did with one tagged run: approved (with its version), refused,
    rejected, unusable or failed (with why in `note`)."""

    run_id: str
    action: str
    version: Version | None = None
    note: str | None = None


def approve(records: Records, run_id: str, who: str, rejudge: Rejudge | None = None) -> Version:
    """Commit a held candidate on top of the head; its corrections become applied.

    If the head moved since it was judged, `rejudge` judges it on the head first (StaleReview
    without one); a rejection there refuses the approval (RejectedOnHead) and changes nothing.
    A version an earlier, interrupted approval committed is kept, not committed again.
    """
    _require_held(records, run_id)
    version = _committed_for(records.versions, run_id)
    if version is None:
        version = _commit_held(records, run_id, rejudge)
        crash_point(APPROVAL_COMMITTED)
    else:
        sync_ledger(records.versions)  # the interrupted approval may have stopped before the ledger
    tracking.record_version(records.mlflow, run_id, version)
    _mark_settled(records, run_id, "approved", who)
    return version


def _committed_for(versions: Versions, run_id: str) -> Version | None:
    return next((version for version in versions.store.versions() if version.run_id == run_id), None)


def _commit_held(records: Records, run_id: str, rejudge: Rejudge | None) -> Version:
    if _abandoned(records, run_id):
        _refuse(records, run_id, "unusable", "mendd", ABANDONED)
        raise UnusableReview(f"run {run_id} cannot be approved: {ABANDONED}")
    if not held_path(records.home, run_id).exists():
        tracking.note_review(records.mlflow, run_id, MISSING_CANDIDATE)
        _refuse(records, run_id, "unusable", "mendd", MISSING_CANDIDATE)
        raise UnusableReview(f"run {run_id} cannot be approved: {MISSING_CANDIDATE} (they are rejected)")
    delta = load_held(records.home, run_id)
    run = records.mlflow.get_run(run_id)
    base, head = run.data.tags.get(tracking.BASE_VERSION_TAG, "?"), records.versions.store.head().tag
    figures = dict(run.data.metrics) if base == head else _judged_again(records, run_id, delta, rejudge, base, head)
    chunk = read_memory_chunk(held_path(records.home, run_id))
    if is_routed(chunk):
        return commit_chunk(records.versions, chunk, run_id=run_id, figures=figures)
    return commit_delta(records.versions, delta, run_id=run_id, figures=figures)


def reject(records: Records, run_id: str, who: str) -> list[str]:
    """Reject a held candidate; its corrections become rejected (and may be submitted again)."""
    _require_held(records, run_id)
    return _refuse(records, run_id, "rejected", who, f"rejected in review by {who}")


def _refuse(records: Records, run_id: str, settled: str, who: str, reason: str) -> list[str]:
    """The run's held corrections rejected with `reason`, then the run settled as `settled`."""
    rows = _held_rows(records, run_id)
    records.versions.ledger.mark([row.key for row in rows], CorrectionStatus.rejected, run_id=run_id, reason=reason)
    _mark_settled(records, run_id, settled, who)
    return [row.external_id for row in rows]


def _mark_settled(records: Records, run_id: str, settled: str, who: str) -> None:
    """Last of a settling: once the settled tag is set the run no longer waits, so all else is done
    before it (a settling stopped earlier is done again; an approval then needs no held file)."""
    held_path(records.home, run_id).unlink(missing_ok=True)
    tracking.mark_settled(records.mlflow, run_id, settled, who)


def settle_tagged(records: Records, rejudge: Rejudge | None = None) -> list[Settled]:
    """Act on every held run whose `mendd.review` tag a person set in the UI.

    An approval the gate rejects on the moved head is refused: the tag is removed and the reason
    left on the run as `mendd.review_note`, so the UI shows why it is still held. A run that cannot
    be settled now is reported as failed and the others are still settled; the next call retries it.
    A run the service left behind when it stopped part-way (ABANDONED) is settled as unusable untagged.
    """
    done = []
    for decision in held(records):
        action = (decision.review or "").strip().lower()
        # An abandoned run is settled untagged: nobody need review what was decided again.
        if action in ("approve", "reject") or _abandoned(records, decision.run_id):
            try:
                done.append(_settle_one(records, decision.run_id, action, rejudge))
            except Exception as error:  # noqa: BLE001 - one run's trouble must not hold up the others
                done.append(Settled(decision.run_id, "failed", note=describe_failure(error)))
    return done


def _settle_one(records: Records, run_id: str, action: str, rejudge: Rejudge | None) -> Settled:
    if action == "reject":
        reject(records, run_id, "mlflow-ui tag")
        return Settled(run_id, "rejected")
    if action != "approve":  # abandoned
        _refuse(records, run_id, "unusable", "mendd", ABANDONED)
        return Settled(run_id, "unusable", note=ABANDONED)
    try:
        return Settled(run_id, "approved", approve(records, run_id, "mlflow-ui tag", rejudge))
    except RejectedOnHead as refused:
        tracking.refuse_review(records.mlflow, run_id, str(refused))
        return Settled(run_id, "refused", note=str(refused))
    except UnusableReview as unusable:
        return Settled(run_id, "unusable", note=str(unusable))


def _abandoned(records: Records, run_id: str) -> bool:
    """Whether a held run's corrections are neither held by it nor applied by its approval: a stop
    between its MLflow run and the ledger left it behind, and its corrections were decided again."""
    owned = (CorrectionStatus.held, CorrectionStatus.applied)
    return not any(row.status in owned for row in records.versions.ledger.of_run(run_id))


def _held_rows(records: Records, run_id: str) -> list[LedgerCorrection]:
    return [row for row in records.versions.ledger.corrections(CorrectionStatus.held) if row.run_id == run_id]


def _judged_again(records: Records, run_id: str, delta: Delta, rejudge: Rejudge | None,
                  base: str, head: str) -> dict[str, float]:
    """The held delta judged on `head` (it was judged on `base`): the figures the version records."""
    if rejudge is None:
        raise StaleReview(f"run {run_id} was judged on {base}, but the head is now {head}: it must be judged "
                          "again on the head, with the model loaded; nothing was changed")
    decision = rejudge(delta, ledger_corrections(_held_rows(records, run_id)))
    tracking.record_rejudged(records.mlflow, run_id, head, decision.outcome, decision.metrics)
    if decision.outcome == "rejected":
        raise RejectedOnHead(f"run {run_id} was held on {base}; judged again on the head {head} it is rejected "
                             f"({'; '.join(decision.reasons)}); nothing was changed")
    return decision.metrics


def _require_held(records: Records, run_id: str) -> None:
    if run_id not in {d.run_id for d in held(records)}:
        raise ReviewError(f"run {run_id} is not a decision waiting for review (see `mendd review list`); nothing was changed")
