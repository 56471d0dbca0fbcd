"""The editor's long jobs behind `mendd train-editor` and `mendd eval`: wiring, progress, MLflow."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from daemon import tracking
from daemon.provision import base_editable
from editors.editable import Editable
from editors.formats import load_corrections
from editors.mend import MendEditor
from editors.registry import make_editor
from editors.settings import TrainSettings
from editors.training import StepLosses, TrainState, train
from editors.types import Correction
from policies.editing_eval import EditReport, Probes, evaluate_editor
from policies.probes import data_dir, unrelated_prompts, wikitext_chunks
from policies.relations import half
from policies.served_eval import Served, ServedReport, edit_all, other_questions_for, read_served, without_subject
from store.models import load_model


def progress_bar(console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    TextColumn("{task.fields[status]}"), console=console, transient=False)


def read_sets(paths: list[Path], limit: int | None = None) -> list[Correction]:
    records: list[Correction] = []
    for path in paths:
        good, _bad = load_corrections(path, limit=limit)
        records.extend(good)
    return records


def make_probes(editable: Editable) -> Probes:
    root = data_dir()
    return Probes(editable, unrelated_prompts(root), wikitext_chunks(root, editable.tokenizer))


def run_eval(model_spec: str, data: Path, editor_name: str, editor_path: Path | None, limit: int | None,
             batch_size: int, console, edit_names: list[str] | None = None,
             projection_threshold: float | None = None, aggregation_strength: float | None = None) -> EditReport:
    """Measure an editor as the service runs it: projected with a threshold, aggregated by least
    squares with a strength."""
    from daemon.suite_files import preserved_covariance
    from editors.registry import guarded

    loaded = load_model(model_spec)
    editable = Editable(loaded.model, loaded.tokenizer, edit_names)
    editor = make_editor(editor_name, editable, model_spec, editor_path)
    if projection_threshold is not None or aggregation_strength is not None:
        with console.status("Measuring the preserved keys..."):
            editor = guarded(editor, editable, preserved_covariance(editable, data_dir()), projection_threshold,
                             aggregation_strength)
    records, errors = load_corrections(data, limit=limit)
    for error in errors[:5]:
        console.print(f"[yellow]skipped[/] {error}")
    with console.status("Measuring the unrelated probes and held-out text before any edit..."):
        probes = make_probes(editable)
    with progress_bar(console) as bar:
        task = bar.add_task(f"editing with {editor_name}", total=len(records), status="")
        return evaluate_editor(editable, editor, records, probes, batch_size, progress=lambda n: bar.advance(task, n))


def edit_as_served(home, config, editable: Editable, records: list[Correction], batch_size: int = 1,
                   progress=None) -> tuple[Served, list[Correction]]:
    """Every record edited, with the editor the service runs, into the model as the home serves it
    (one routed memory keyed against the home's pinned reference, or summed weights): the served
    model and the records it carries (policies/served_eval.edit_all)."""
    from daemon.runtime import service_editor
    from daemon.suite_files import routing_reference
    from editors.registry import relation_reader

    routed = config.editor.memory == "routed"
    reference = routing_reference(home, editable, config.editor.routing_layer) if routed else None
    reader = relation_reader(config.model, config.editor.relation_floor) if routed else None
    return edit_all(editable, service_editor(home, editable, config), records, reference, config.editor.routing_tau,
                    config.editor.routing_margin, batch_size, progress, config.editor.compression(), reader)


def run_served_eval(home, config, data: Path, limit: int | None, batch_size: int, keep_subject: bool, tokens: int,
                    console, ask: str | None = None) -> ServedReport:
    """Edit every record into the model the home serves (one routed memory, or summed weights), with
    the editor the service runs, and read the continuations (policies/served_eval.py); other
    questions only about the subjects of half `ask` (`policies.relations.half`), given one."""
    editable = base_editable(config)
    records, errors = load_corrections(data, limit=limit)
    for error in errors[:5]:
        console.print(f"[yellow]skipped[/] {error}")
    # made while the records still name their subjects
    questions = other_questions_for([r for r in records if ask is None or half(r.subject or "") == ask])
    if not keep_subject:
        records = without_subject(records)
    with progress_bar(console) as bar:
        into = "routed memory" if config.editor.memory == "routed" else "weights"
        task = bar.add_task(f"editing into the {into}", total=len(records), status="")
        served, edited = edit_as_served(home, config, editable, records, batch_size,
                                        progress=lambda n: bar.advance(task, n))
    with console.status(f"Generating {tokens}-token answers with and without the edits..."):
        return read_served(served, edited, keep_subject, tokens, questions=questions)


def run_training(model_spec: str, data: list[Path], val: Path | None, out: Path, settings: TrainSettings,
                 tracking_uri: str, artifact_root: Path, console, edit_names: list[str] | None = None,
                 general_locality: bool = True, init: Path | None = None) -> TrainState:
    """Train (resuming from `out` if a checkpoint is there), logging the run to MLflow.

    A new run starts from the editor file `init` when given (to continue training a shipped editor
    under other settings), else from the identity initialisation.
    """
    torch.manual_seed(settings.seed)
    job = load_training_job(model_spec, data, val, settings, edit_names, init)
    projectors = preserved_projectors(job.editable, settings.projection_threshold, console)
    probes = make_probes(job.editable) if job.val_set else None
    # the training half of the unrelated sources; the measuring half is never trained on
    general = unrelated_prompts(data_dir(), 10_000, 10_000, half=1) if general_locality else None

    client = tracking.client(tracking_uri)
    params = {**asdict(settings), "model": model_spec, "data": ",".join(map(str, data)), "val": str(val),
              "edit_tensors": ",".join(job.editable.edit_names), "general_locality": general_locality,
              "init": str(init)}
    run_id = open_training_run(client, artifact_root, out, f"train {model_spec} -> {out.name}", params)

    with progress_bar(console) as bar:
        log = TrainingLog(client, run_id, console, bar, settings.steps)

        def validate(editor: MendEditor) -> dict:
            return log.validation(evaluate_editor(job.editable, editor, job.val_set, probes).as_dict())

        state = train(job.editable, job.editor, job.train_set, settings, out,
                      validate=validate if job.val_set else None, on_step=log.step, general=general,
                      projectors=projectors)
    close_training_run(client, run_id, state, out)
    return state


@dataclass(frozen=True)
class TrainingJob:
    """What a training run trains: the model's editable tensors, the editor, and its data."""

    editable: Editable
    editor: MendEditor
    train_set: list[Correction]
    val_set: list[Correction]


def load_training_job(model_spec: str, data: list[Path], val: Path | None, settings: TrainSettings,
                      edit_names: list[str] | None, init: Path | None) -> TrainingJob:
    """The model, the training and validation sets, and the editor: loaded from `init`, else fresh."""
    loaded = load_model(model_spec)
    editable = Editable(loaded.model, loaded.tokenizer, edit_names)
    train_set = read_sets(data)
    val_set = read_sets([val], limit=settings.val_size) if val else []
    if init is not None:
        editor = MendEditor.load(init, editable)
    else:
        editor = MendEditor.fresh(editable, rank=settings.rank, edit_lr=settings.edit_lr, model_spec=model_spec)
    return TrainingJob(editable, editor, train_set, val_set)


def preserved_projectors(editable: Editable, threshold: float | None, console) -> dict[str, torch.Tensor] | None:
    """The null-space projectors that keep training's edits off the preserved keys; None without a threshold."""
    if threshold is None:
        return None
    from daemon.suite_files import preserved_covariance
    from editors.projection import null_space_projectors

    console.print("Measuring the preserved keys for the projection...")
    return null_space_projectors(preserved_covariance(editable, data_dir()), threshold)


def open_training_run(client, artifact_root: Path, out: Path, run_name: str, params: dict) -> str:
    """The MLflow run of the editor at `out`: the one named in its side file when training resumes,
    else a new run with `params`, named in the side file for the next resume."""
    experiment = tracking.experiment_id(client, tracking.TRAINING_EXPERIMENT, artifact_root)
    run_file = out.with_suffix(".mlflow-run")
    if run_file.exists():
        return run_file.read_text().strip()
    run_id = client.create_run(experiment, run_name=run_name).info.run_id
    out.parent.mkdir(parents=True, exist_ok=True)
    run_file.write_text(run_id)
    for key, value in params.items():
        client.log_param(run_id, key, value)
    return run_id


def close_training_run(client, run_id: str, state: TrainState, out: Path) -> None:
    """Record the training time and the editor file, and end the run."""
    client.log_metric(run_id, "train_seconds", state.seconds)
    client.log_artifact(run_id, str(out))
    client.set_terminated(run_id)


@dataclass
class TrainingLog:
    """Where training reports: the progress bar, the console, and the MLflow run."""

    client: Any
    run_id: str
    console: Any
    bar: Progress
    steps: int
    task: TaskID = field(init=False)
    last_step: int = 0  # validation metrics are logged at the step training last reported
    # step losses wait here and go to MLflow in batches: one request per step would slow training
    pending: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.task = self.bar.add_task("meta-training MEND", total=self.steps, status="")

    def step(self, state: TrainState, losses: StepLosses) -> None:
        from mlflow.entities import Metric

        self.last_step = state.step
        status = f"edit {losses.edit:.2f} loc {losses.loc:.3f} success {losses.edit_success:.2f}"
        self.bar.update(self.task, completed=state.step, status=status)
        if not self.console.is_terminal and state.step % 50 == 0:  # a log file gets a line now and then
            self.console.print(f"step {state.step}/{self.steps} {state.seconds:.0f}s {status}")
        now = int(time.time() * 1000)
        self.pending.extend(Metric(k, getattr(losses, k), now, state.step)
                            for k in ("total", "edit", "loc", "edit_success"))
        if len(self.pending) >= 200 or state.step == self.steps:
            self.client.log_batch(self.run_id, metrics=self.pending)
            self.pending.clear()

    def validation(self, report: dict) -> dict:
        for key in ("reliability", "generalization", "neighborhood", "locality", "ppl_drawdown"):
            self.client.log_metric(self.run_id, f"val_{key}", report[key], step=self.last_step)
        self.console.print(f"step {self.last_step}: val {json.dumps(report)}")
        return report
