"""The editor's long jobs behind `mendd train-editor` and `mendd eval`: wiring, progress, MLflow."""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from daemon import tracking
from editors.editable import Editable
from editors.formats import load_corrections
from editors.mend import MendEditor
from editors.registry import make_editor
from editors.settings import TrainSettings
from editors.training import StepLosses, TrainState, train
from editors.types import Correction
from policies.editing_eval import EditReport, Probes, evaluate_editor
from policies.probes import data_dir, unrelated_prompts, wikitext_chunks
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


def run_training(model_spec: str, data: list[Path], val: Path | None, out: Path, settings: TrainSettings,
                 tracking_uri: str, artifact_root: Path, console, edit_names: list[str] | None = None,
                 general_locality: bool = True, init: Path | None = None) -> TrainState:
    """Train (resuming from `out` if a checkpoint is there), logging the run to MLflow.

    A new run starts from the editor file `init` when given (to continue training a shipped editor
    under other settings), else from the identity initialisation.
    """
    torch.manual_seed(settings.seed)
    loaded = load_model(model_spec)
    editable = Editable(loaded.model, loaded.tokenizer, edit_names)
    train_set = read_sets(data)
    val_set = read_sets([val], limit=settings.val_size) if val else []
    if init is not None:
        editor = MendEditor.load(init, editable)
    else:
        editor = MendEditor.fresh(editable, rank=settings.rank, edit_lr=settings.edit_lr, model_spec=model_spec)
    projectors = None
    if settings.projection_threshold is not None:
        from daemon.suite_files import preserved_covariance
        from editors.projection import null_space_projectors

        console.print("Measuring the preserved keys for the projection...")
        projectors = null_space_projectors(preserved_covariance(editable, data_dir()), settings.projection_threshold)
    probes = make_probes(editable) if val_set else None
    # the training half of the unrelated sources; the measuring half is never trained on
    general = unrelated_prompts(data_dir(), 10_000, 10_000, half=1) if general_locality else None

    client = tracking.client(tracking_uri)
    experiment = tracking.experiment_id(client, tracking.TRAINING_EXPERIMENT, artifact_root)
    run_file = out.with_suffix(".mlflow-run")
    run_id = run_file.read_text().strip() if run_file.exists() else None
    if run_id is None:
        run_id = client.create_run(experiment, run_name=f"train {model_spec} -> {out.name}").info.run_id
        out.parent.mkdir(parents=True, exist_ok=True)
        run_file.write_text(run_id)
        for key, value in {**asdict(settings), "model": model_spec, "data": ",".join(map(str, data)),
                           "val": str(val), "edit_tensors": ",".join(editable.edit_names),
                           "general_locality": general_locality, "init": str(init)}.items():
            client.log_param(run_id, key, value)

    def validate(ed: MendEditor) -> dict:
        report = evaluate_editor(editable, ed, val_set, probes).as_dict()
        for key in ("reliability", "generalization", "neighborhood", "locality", "ppl_drawdown"):
            client.log_metric(run_id, f"val_{key}", report[key], step=state_step[0])
        console.print(f"step {state_step[0]}: val {json.dumps(report)}")
        return report

    state_step = [0]
    pending: list = []
    from mlflow.entities import Metric

    with progress_bar(console) as bar:
        task = bar.add_task("meta-training MEND", total=settings.steps, status="")

        def on_step(state: TrainState, losses: StepLosses) -> None:
            state_step[0] = state.step
            status = f"edit {losses.edit:.2f} loc {losses.loc:.3f} success {losses.edit_success:.2f}"
            bar.update(task, completed=state.step, status=status)
            if not console.is_terminal and state.step % 50 == 0:  # a log file gets a line now and then
                console.print(f"step {state.step}/{settings.steps} {state.seconds:.0f}s {status}")
            now = int(time.time() * 1000)
            pending.extend(Metric(k, getattr(losses, k), now, state.step) for k in ("total", "edit", "loc", "edit_success"))
            if len(pending) >= 200 or state.step == settings.steps:
                client.log_batch(run_id, metrics=pending)
                pending.clear()

        state = train(editable, editor, train_set, settings, out, validate=validate if val_set else None,
                      on_step=on_step, general=general, projectors=projectors)
    client.log_metric(run_id, "train_seconds", state.seconds)
    client.log_artifact(run_id, str(out))
    client.set_terminated(run_id)
    return state
