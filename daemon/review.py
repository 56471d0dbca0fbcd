"""Held decisions: their candidate deltas wait in the home until a person settles them.

A person approves or rejects with `mendd review approve|reject RUN_ID`, or by setting the tag
`mendd.review` to `approve`/`reject` on the run in the MLflow UI; :func:`settle_tagged` acts on
those tags (the service calls it on every tick). Approving commits the held delta on top of the
current head (deltas add, so later versions keep their corrections).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from daemon import tracking
from daemon.home import Home
from daemon.runtime import Records
from daemon.versioning import commit_delta, share_from_stored, share_to_stored
from editors.types import Delta
from store.errors import StoreError
from store.ledger_schema import CorrectionStatus
from store.versions import Version, read_shares, write_shares


class ReviewError(StoreError):
    """A review that cannot be carried out; nothing was changed."""


@dataclass(frozen=True)
class HeldDecision:
    run_id: str
    started: datetime
    base_version: str
    corrections: str
    reasons: str
    review: str | None  # the reviewer's tag, if set but not yet acted on

    def as_dict(self) -> dict:
        return {**self.__dict__, "started": self.started.isoformat()}


def save_held(home: Home, run_id: str, delta: Delta) -> None:
    """Keep a held candidate's shares (low-rank factors, or dense for fine-tuning) until review."""
    home.held_dir.mkdir(parents=True, exist_ok=True)
    write_shares(held_path(home, run_id), [share_to_stored(share) for share in delta.shares], {"editor": delta.editor})


def load_held(home: Home, run_id: str) -> Delta:
    path = held_path(home, run_id)
    if not path.exists():
        raise ReviewError(f"no held candidate for run {run_id} at {path}; `mendd review list` shows what waits")
    stored, metadata = read_shares(path)
    return Delta(editor=metadata["editor"], shares=[share_from_stored(share) for share in stored])


def held_path(home: Home, run_id: str) -> Path:
    return home.held_dir / f"{run_id}.safetensors"


def held(records: Records) -> list[HeldDecision]:
    out = []
    for run in tracking.held_runs(records.mlflow, records.experiment):
        tags = run.data.tags
        out.append(HeldDecision(
            run.info.run_id, datetime.fromtimestamp(run.info.start_time / 1000, timezone.utc),
            tags.get("mendd.base_version", "?"), tags.get("mendd.corrections", ""), tags.get("mendd.reasons", ""),
            tags.get(tracking.REVIEW_TAG)))
    return out


def approve(records: Records, run_id: str, who: str) -> Version:
    """Commit a held candidate on top of the head; its corrections become applied."""
    _require_held(records, run_id)
    delta = load_held(records.home, run_id)
    figures = records.mlflow.get_run(run_id).data.metrics
    version = commit_delta(records.versions, delta, run_id=run_id, figures=dict(figures))
    records.mlflow.set_tag(run_id, tracking.SETTLED_TAG, "approved")
    records.mlflow.set_tag(run_id, "mendd.settled_by", who)
    records.mlflow.set_tag(run_id, tracking.VERSION_TAG, version.tag)
    records.mlflow.set_tag(run_id, tracking.GIT_SHA_TAG, version.sha)
    held_path(records.home, run_id).unlink(missing_ok=True)
    return version


def reject(records: Records, run_id: str, who: str) -> list[str]:
    """Reject a held candidate; its corrections become rejected (and may be submitted again)."""
    _require_held(records, run_id)
    rows = [row for row in records.versions.ledger.corrections(CorrectionStatus.held) if row.run_id == run_id]
    records.versions.ledger.mark([row.key for row in rows], CorrectionStatus.rejected, run_id=run_id,
                                 reason=f"rejected in review by {who}")
    records.mlflow.set_tag(run_id, tracking.SETTLED_TAG, "rejected")
    records.mlflow.set_tag(run_id, "mendd.settled_by", who)
    held_path(records.home, run_id).unlink(missing_ok=True)
    return [row.external_id for row in rows]


def settle_tagged(records: Records) -> list[tuple[str, str, Version | None]]:
    """Act on every held run whose `mendd.review` tag a person set in the UI: (run, action, version)."""
    done = []
    for decision in held(records):
        action = (decision.review or "").strip().lower()
        if action == "approve":
            done.append((decision.run_id, "approved", approve(records, decision.run_id, "mlflow-ui tag")))
        elif action == "reject":
            reject(records, decision.run_id, "mlflow-ui tag")
            done.append((decision.run_id, "rejected", None))
    return done


def _require_held(records: Records, run_id: str) -> None:
    if run_id not in {d.run_id for d in held(records)}:
        raise ReviewError(f"run {run_id} is not a decision waiting for review (see `mendd review list`); nothing was changed")
