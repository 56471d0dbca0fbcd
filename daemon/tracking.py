"""MLflow at the edge: a sqlite backend inside the home, an explicit artifact location per experiment."""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from editors.formats import to_record
from editors.types import Correction, EditInputError
from policies.gate import Decision
from policies.policy import Policy
from store.versions import Version

TRAINING_EXPERIMENT = "mendd-editor-training"


def client(tracking_uri: str):
    """An MlflowClient for the home's backend; quiet about its own migrations and telemetry."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    # A tracking server that is down fails a cycle in seconds (and the next check retries), instead
    # of MLflow's default of minutes of retries holding the service's only worker.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=tracking_uri)


def experiment_id(mlflow_client, name: str, artifact_root: Path) -> str:
    """The experiment's id, creating it with its artifacts under `artifact_root/name`."""
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = (artifact_root / name).resolve()
    location.mkdir(parents=True, exist_ok=True)
    return mlflow_client.create_experiment(name, artifact_location=location.as_uri())


def experiment_name(base: str, model: str) -> str:
    """One experiment per model: decisions about different models never mix in one table."""
    return f"{base}/{model}"


# -- decisions --------------------------------------------------------------------------------
# One run per decision. Tags carry what a reviewer filters on; the per-example table is logged
# with log_table so the MLflow UI shows it in the run's artifacts (and in the evaluation view).

DECISION_TAG = "mendd.decision"
REVIEW_TAG = "mendd.review"  # set by a person in the UI: approve | reject
SETTLED_TAG = "mendd.settled"  # set by mendd once a held decision is settled: approved | rejected | unusable | split
VERSION_TAG = "mendd.version"
GIT_SHA_TAG = "mendd.git_sha"
BASE_VERSION_TAG = "mendd.base_version"  # the head the decision was judged on
EDITOR_TAG = "mendd.editor"
ACTION_TAG = "mendd.action"
CORRECTIONS_TAG = "mendd.corrections"
REASONS_TAG = "mendd.reasons"
ERROR_TAG = "mendd.error"
REVIEW_NOTE_TAG = "mendd.review_note"  # why a held run still waits (set by mendd)
SETTLED_BY_TAG = "mendd.settled_by"
REJUDGED_ON_TAG = "mendd.rejudged_on"  # the head a stale approval was judged again on
REJUDGED_TAG = "mendd.rejudged"
MAX_TAG = 4000  # MLflow caps tag values; long lists are cut and the artifact has them whole


@dataclass(frozen=True)
class DecisionRecord:
    """Everything a decision's run records."""

    decision: Decision
    corrections: list[Correction]
    base: Version  # the version the candidate was judged against
    editor: str
    policy: Policy
    holding: list[str]  # corrections the model already answered as asked
    invalid: list[EditInputError]
    batch_size: int
    timings: dict[str, float]  # seconds per stage: edit, gate
    action: str = "edit"  # edit: the corrections' change is added; revert: it is taken out


def open_decision_run(mlflow_client, experiment: str, record: DecisionRecord) -> str:
    """Create the decision's run with all it knows before any commit; returns its id."""
    from mlflow.entities import Metric, Param

    decision = record.decision
    ids = [c.id for c in record.corrections]
    tags = {
        DECISION_TAG: decision.outcome,
        BASE_VERSION_TAG: record.base.tag,
        GIT_SHA_TAG: record.base.sha,
        EDITOR_TAG: record.editor,
        ACTION_TAG: record.action,
        CORRECTIONS_TAG: cut(", ".join(ids)),
        REASONS_TAG: cut(" | ".join(decision.reasons) or "every check passes"),
        "mlflow.note.content": _note(record),
    }
    what = "" if record.action == "edit" else f" {record.action}"
    run = mlflow_client.create_run(experiment, run_name=f"{decision.outcome}{what}: {cut(', '.join(ids), 80)}", tags=tags)
    run_id = run.info.run_id
    stamp = int(time.time() * 1000)
    params = {"base_version": record.base.tag, "editor": record.editor, "batch_size": record.batch_size,
              "n_corrections": len(ids), "policy": record.policy.source, **record.policy.as_params()}
    metrics = {**decision.metrics, **{f"{stage}_seconds": s for stage, s in record.timings.items()},
               "holding": len(record.holding), "invalid": len(record.invalid)}
    mlflow_client.log_batch(
        run_id, metrics=[Metric(k, float(v), stamp, 0) for k, v in metrics.items()],
        params=[Param(k, str(v)) for k, v in params.items()], tags=[])
    lines = [json.dumps({"id": c.id, **to_record(c)}) for c in record.corrections]
    mlflow_client.log_text(run_id, "\n".join(lines) + "\n", "corrections.jsonl")
    mlflow_client.log_text(run_id, _note(record), "decision.txt")
    mlflow_client.log_table(run_id, _table(decision), "examples.json")
    return run_id


def mark_split(mlflow_client, run_id: str) -> None:
    """A held batch the cycle decides again in parts waits for no review: its parts' runs do."""
    mlflow_client.set_tag(run_id, SETTLED_TAG, "split")


def close_decision_run(mlflow_client, run_id: str, version: Version | None, failed: str | None = None) -> None:
    """Record the version a decision made (if any) and end the run."""
    if version is not None:
        record_version(mlflow_client, run_id, version)
    if failed:
        mlflow_client.set_tag(run_id, ERROR_TAG, cut(failed))
    mlflow_client.set_terminated(run_id, "FAILED" if failed else "FINISHED")


def record_version(mlflow_client, run_id: str, version: Version) -> None:
    """The version a decision's run made (at the decision, or later by an approval)."""
    mlflow_client.set_tag(run_id, VERSION_TAG, version.tag)
    mlflow_client.set_tag(run_id, GIT_SHA_TAG, version.sha)


def mark_settled(mlflow_client, run_id: str, settled: str, who: str) -> None:
    """A held run settled (approved, rejected, unusable): it no longer waits for review."""
    mlflow_client.set_tag(run_id, SETTLED_BY_TAG, who)
    mlflow_client.set_tag(run_id, SETTLED_TAG, settled)


def note_review(mlflow_client, run_id: str, note: str) -> None:
    """Why a held run still waits, shown beside it in the UI."""
    mlflow_client.set_tag(run_id, REVIEW_NOTE_TAG, cut(note))


def refuse_review(mlflow_client, run_id: str, note: str) -> None:
    """A person's review tag that could not be acted on: removed, and the reason left as a note."""
    mlflow_client.delete_tag(run_id, REVIEW_TAG)
    note_review(mlflow_client, run_id, note)


def record_rejudged(mlflow_client, run_id: str, head: str, outcome: str, metrics: dict[str, float]) -> None:
    """A stale approval judged again on the head: its figures there and the outcome."""
    for name, value in metrics.items():
        mlflow_client.log_metric(run_id, f"rejudged.{name}", value)
    mlflow_client.set_tag(run_id, REJUDGED_ON_TAG, head)
    mlflow_client.set_tag(run_id, REJUDGED_TAG, outcome)


def held_runs(mlflow_client, experiment: str, page_size: int = 1000) -> list:
    """Held decisions not yet settled, oldest first: all of them, a page at a time.

    Settled runs keep their `held` tag, so the search asks for runs without the settled tag: asking
    for every held run would fill the pages with settled ones and push waiting ones out.
    """
    unsettled = f"tags.`{DECISION_TAG}` = 'held' AND tags.`{SETTLED_TAG}` IS NULL"
    runs, token = [], None
    while True:
        page = mlflow_client.search_runs([experiment], filter_string=unsettled, order_by=["attributes.start_time ASC"],
                                         max_results=page_size, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _table(decision: Decision) -> dict[str, list]:
    columns = ("kind", "correction_id", "prompt", "target", "before", "after", "passed")
    return {name: [getattr(e, name) for e in decision.examples] for name in columns}


def _note(record: DecisionRecord) -> str:
    lines = [f"Decision: {record.decision.summary()}", ""]
    if record.action == "revert":
        lines += [f"Revert of {', '.join(c.id for c in record.corrections)}: the weights without their change.", ""]
    lines += [f"Judged against {record.base.tag} with editor {record.editor} and policy {record.policy.source}.", ""]
    lines += [f"- {c.words()}" for c in record.decision.checks]
    if record.holding:
        lines += ["", f"Already answered as asked (no edit needed): {', '.join(record.holding)}"]
    if record.invalid:
        lines += ["", "Could not be edited:"] + [f"- {error}" for error in record.invalid]
    return "\n".join(lines)


def cut(text: str, limit: int = MAX_TAG) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
