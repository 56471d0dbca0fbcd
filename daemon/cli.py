"""The ``mendd`` command line.

Operator mistakes (a bad config value, a model spec that cannot be loaded, an existing home) end in
one readable paragraph on stderr and exit code 2, never a traceback. Heavy imports (torch,
transformers) happen inside the commands that need them, so ``mendd --help`` stays instant.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from daemon.config import ConfigError, MenddConfig, check_serving, load_config
from daemon.home import Home, HomeError, check_new_home, init_home, resolve_home
from editors.settings import TrainSettings
from store.errors import StoreError

if TYPE_CHECKING:  # torch-heavy modules, imported by the commands that need them
    from store.ledger import LedgerCorrection
    from store.versions import Recovery, Version

USAGE_ERROR = 2

# Results go to stdout as plain text (print); messages and progress go to stderr through rich.
# soft_wrap: long messages stay on one line, so paths and keys are never broken across lines.
err = Console(stderr=True, soft_wrap=True)

DEFAULT_MODEL: str = MenddConfig.model_fields["model"].default


# Operator errors from modules that import torch: named here, checked only once their module is loaded
# (if the error is one of them, that module has necessarily been loaded already).
_LAZY_OPERATOR_ERRORS = (("store.models", "ModelSpecError"), ("editors.registry", "EditorNotFound"),
                         ("daemon.suite_files", "SuitesError"), ("policies.policy", "PolicyError"))


def _is_operator_error(error: Exception) -> bool:
    if isinstance(error, (ConfigError, HomeError, StoreError)):
        return True
    for module_name, class_name in _LAZY_OPERATOR_ERRORS:
        module = sys.modules.get(module_name)
        if module is not None and isinstance(error, getattr(module, class_name)):
            return True
    return False


class _MenddApp(typer.Typer):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except Exception as error:
            if not _is_operator_error(error):
                raise
            err.print(f"[bold red]error:[/] {escape(str(error))}")
            sys.exit(USAGE_ERROR)


app = _MenddApp(
    name="mendd",
    help="Keep a language model's facts current: MEND edits, gated commits, MLflow review, "
    "git+DVC versions.",
    no_args_is_help=True,
    add_completion=False,
)
review_app = typer.Typer(help="Decisions held for a human: list, approve, reject.", no_args_is_help=True)
app.add_typer(review_app, name="review")
suites_app = typer.Typer(help="The regression suites the gate runs: show, pin, extend.", no_args_is_help=True)
app.add_typer(suites_app, name="suites")

JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON to stdout.")]
RunId = Annotated[str, typer.Argument(help="MLflow run id of the held decision.")]


@app.callback()
def main(
    ctx: typer.Context,
    home: Annotated[
        Path | None,
        typer.Option(
            "--home",
            help="The mendd home folder holding all state. Default: $MENDD_HOME, else ~/.mendd.",
            show_default=False,
        ),
    ] = None,
) -> None:
    ctx.obj = resolve_home(home)


def _config(ctx: typer.Context) -> MenddConfig:
    """Every command that works on a home validates its config first, so a bad value stops it
    at start with the key, the value and what is allowed."""
    return load_config(ctx.obj)


@app.command()
def init(
    ctx: typer.Context,
    model: Annotated[
        str, typer.Option(help="Base model: smollm2-135m, tiny-llama or hf:/path/to/folder.")
    ] = DEFAULT_MODEL,
    force: Annotated[bool, typer.Option(help="Overwrite an existing mendd.yaml with the defaults.")] = False,
) -> None:
    """Create the home, its commented default config, and the version store with the base model as v0000."""
    from daemon.versioning import create_versions
    from store.models import load_model
    from store.versions import VersionStore

    home: Home = ctx.obj
    check_new_home(home, force)
    # The model is loaded before anything is written, so a bad spec leaves no half-made home.
    store_exists = VersionStore(home.store_dir).exists()
    loaded = None if store_exists else load_model(model)
    init_home(home, model, force=force)
    print(f"mendd home:  {home.root}")
    print(f"config:      {home.config_path}")
    if store_exists:
        print(f"store:       {home.store_dir} (kept: it already holds versions)")
        return
    base = create_versions(home, loaded.model, loaded.tokenizer, model)
    print(f"store:       {home.store_dir} ({base.tag}: base model {model})")
    _pin(home, _config(ctx), loaded, base.tag, None)


def _pin(home: Home, config: MenddConfig, loaded, version: str, data: Path | None) -> None:
    """Pin the regression suites from `loaded`; without the data they can be pinned later."""
    from daemon.suite_files import SuitesError, pin_suites
    from editors.editable import Editable

    editable = Editable(loaded.model, loaded.tokenizer, config.editor.edit_layers)
    try:
        with err.status("Pinning the regression suites from the base model..."):
            routed = config.editor.routing_layer if config.editor.memory == "routed" else None
            suites = pin_suites(home, editable, config.model, version, data, routed)
    except SuitesError as error:
        err.print(f"[yellow]warning:[/] {escape(str(error))}\nPin them later: mendd suites pin --data DIR")
        return
    print(f"suites:      {home.suites_path} ({_describe_suites(suites)})")


def _describe_suites(suites) -> str:
    kinds: dict[str, int] = {}
    for probe in suites.locality:
        kinds[probe.kind] = kinds.get(probe.kind, 0) + 1
    parts = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    return (f"{len(suites.locality)} locality prompts ({parts}); perplexity sample of "
            f"{sum(len(c) for c in suites.perplexity.chunks)} tokens; pinned from {suites.pinned_from}")


@app.command()
def demo(
    home: Annotated[Optional[Path], typer.Option("--demo-home", help="Folder for the demo home; default: a new temporary folder.")] = None,
) -> None:
    """The whole way through on a fresh home: a demo feed edited, gated, recorded and versioned."""
    from rich.table import Table
    from transformers.utils import logging as hf_logging

    from daemon.demo import run_demo

    hf_logging.disable_progress_bar()
    demo_home, rows, _cycles, neighbours = run_demo(home, lambda text: err.print(text, markup=False, highlight=False))
    table = Table(title="mendd demo: correction -> decision -> version")
    for column in ("id", "prompt", "target", "decision", "version", "before", "after"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row.correction_id, row.prompt[:40], row.target[:20], row.status, row.version or "-",
                      row.before, row.after)
    Console(width=160).print(table)
    for row in rows:
        if row.status in ("rejected", "held", "quarantined", "superseded"):
            print(f"  {row.correction_id} {row.status}: {row.reason[:300]}")
    for title, other in (("neighbours no correction is about: their answers must not change", False),
                         ("other questions about corrected subjects: a correction answers its own question only", True)):
        near = Table(title=title)
        for column in ("prompt", "about" if other else "next to", "before", "after", "unchanged"):
            near.add_column(column, overflow="fold")
        for row in (r for r in neighbours if r.other_question == other):
            near.add_row(row.prompt, row.next_to, row.before, row.after, "yes" if row.unchanged else "NO")
        Console(width=160).print(near)
    store = demo_home.store_dir
    print(f"""
Next steps:
  mendd --home {demo_home.root} versions
  mendd --home {demo_home.root} review list
  mendd --home {demo_home.root} ui            # then open http://127.0.0.1:5000
  # roll back by hand, as an operator: serve v0000 again
  cd {store} && git checkout v0000 -- model.dvc && dvc checkout
  # or the same through mendd (a new version on top, history kept)
  mendd --home {demo_home.root} rollback v0000""")


@app.command()
def run(ctx: typer.Context) -> None:
    """Run the maintenance service: feeds, cycles, reviews, HTTP health and metrics (sd_notify aware)."""
    import logging

    from daemon.service import Service

    config = _config(ctx)
    check_serving(config, ctx.obj)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("apscheduler", "alembic", "mlflow", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    raise typer.Exit(Service(ctx.obj, config).run())


@app.command()
def cycle(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Run one maintenance cycle now (waits for the home lock if the service is mid-cycle)."""
    from daemon.cycle import run_cycle
    from daemon.home_lock import home_lock
    from daemon.runtime import Runtime

    config = _config(ctx)
    with home_lock(ctx.obj):
        with err.status("Loading the served model, editor and suites..."):
            rt = Runtime.open(ctx.obj, config)
        try:
            report = run_cycle(rt)
        finally:
            rt.close()
    if as_json:
        print(json.dumps(report.as_dict()))
        return
    print(f"cycle {report.cycle_id}: {report.outcome}; serving {report.version}")
    for step in report.as_dict()["decisions"]:
        print(f"  {step['outcome'] or 'no edit'}: {', '.join(step['corrections'] + step['holding']) or '-'}"
              f"{'  -> ' + step['version'] if step['version'] else ''}  run {step['run_id'] or '-'}")
        for reason in step["reasons"]:
            print(f"    {reason}")
    for cid in report.superseded:
        print(f"  superseded: {cid}")


@app.command()
def ask(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="The text the served model continues.")],
    tokens: Annotated[int, typer.Option(min=1, max=512, help="How many tokens to generate (greedy).")] = 12,
    as_json: JsonFlag = False,
) -> None:
    """What the served version says: its greedy continuation of PROMPT, and with editor.memory routed,
    which correction's entry served it."""
    from daemon.home_lock import home_lock
    from daemon.runtime import Runtime
    from editors.routing import NONE
    from editors.serving import continuation, serving_entry

    config = _config(ctx)
    with home_lock(ctx.obj):
        with err.status("Loading the served model..."):
            rt = Runtime.open(ctx.obj, config)
    try:
        chosen = serving_entry(rt.editable, prompt, rt.memory) if rt.memory is not None else NONE
        text = continuation(rt.editable, prompt, tokens, rt.memory, chosen)
        served_by = rt.memory.entries[chosen].correction_id if chosen != NONE else None
        version = rt.served.tag
    finally:
        rt.close()
    if text is None:
        raise typer.BadParameter("the prompt is empty once tokenized", param_hint="PROMPT")
    if as_json:
        print(json.dumps({"version": version, "prompt": prompt, "continuation": text, "served_by": served_by}))
        return
    print(f"{version}: {prompt} [{text}]" + (f"  (entry of {served_by})" if served_by else ""))


@app.command()
def submit(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="Corrections: mendd JSONL, CounterFact, zsRE or MQuAKE.")],
    fmt: Annotated[str, typer.Option("--format", help="auto, mendd, counterfact, rome, zsre or mquake.")] = "auto",
    as_json: JsonFlag = False,
) -> None:
    """Enqueue corrections from a file by hand (bad records are quarantined with their reason)."""
    from daemon.feeds import ingest, located
    from editors.formats import FORMATS
    from store.ledger import Ledger

    home: Home = ctx.obj
    _config(ctx)
    if fmt != "auto" and fmt not in FORMATS:
        raise HomeError(f"unknown --format {fmt!r}; choose auto or one of {', '.join(FORMATS)}")
    if not file.is_file():
        raise HomeError(f"{file} is not a file")
    ledger = Ledger(home.ledger_url)
    try:
        with open(file, "rb") as handle:
            report = ingest(ledger, home, "submit", located(file.name, handle, fmt, f"submit:{file.name}"))
    finally:
        ledger.close()
    if as_json:
        print(json.dumps(report.__dict__))
        return
    print(f"{report.received} received, {report.duplicates} already known, {report.quarantined} quarantined")
    for reason in report.reasons:
        print(f"  quarantined {reason}")


@app.command()
def status(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Served version, corrections by status, last cycle, feed cursors, service health."""
    from daemon.health import read_health
    from daemon.status import snapshot
    from daemon.versioning import open_versions

    config = _config(ctx)
    opened = open_versions(ctx.obj, config)
    try:
        state = snapshot(opened, read_health(ctx.obj.health_path), [f.name for f in config.feeds])
    finally:
        opened.close()
    if as_json:
        print(json.dumps(state))
        return
    counts = state["corrections"]
    print(f"version:      {state['version']}")
    print("corrections:  " + (", ".join(f"{n} {name}" for name, n in counts.items() if n) or "none"))
    last = state["last_cycle"]
    described = "none" if last is None else f"#{last['id']} {last['outcome']} at {last['started_at']}"
    print(f"last cycle:   {described}")
    for name, cursor in state["feeds"].items():
        print(f"feed {name}: cursor {cursor}")
    health = state["health"]
    print(f"health:       {'ok' if health.get('ok') else 'degraded'}")
    for component, problem in health.get("problems", {}).items():
        print(f"  {component}: {problem}")


@app.command()
def versions(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List the committed model versions, oldest first."""
    from daemon.versioning import open_versions

    opened = open_versions(ctx.obj, _config(ctx))
    try:
        listed = opened.store.versions()
    finally:
        opened.close()
    if as_json:
        print(json.dumps({"head": listed[-1].tag, "versions": [v.as_dict() for v in listed]}))
        return
    for version in listed:
        print(_describe_version(version))


def _describe_version(version: Version) -> str:
    """One line: tag, date, what it did, parent, corrections, MLflow run, decision figures."""
    what = {"base": version.reason, "edit": f"applied {', '.join(version.corrections)}",
            "rollback": f"restored {version.restores}", "revert": f"reverted {', '.join(version.corrections)}"}
    parts = [version.tag, version.created_at.strftime("%Y-%m-%d %H:%M:%S"), version.kind,
             f"parent {version.parent or '-'}", what[version.kind]]
    if version.run_id:
        parts.append(f"run {version.run_id}")
    if version.figures:
        parts.append(" ".join(f"{key}={value:g}" for key, value in sorted(version.figures.items())))
    return "  ".join(parts)


@app.command()
def rollback(
    ctx: typer.Context,
    version: Annotated[str, typer.Argument(help="Version tag, e.g. v0003.")],
) -> None:
    """Make the served model equal to an earlier version (as a new commit; history is kept)."""
    from daemon.commits import rollback as roll_back
    from daemon.versioning import changing

    with changing(ctx.obj, _config(ctx)) as (opened, recovery):
        _report_recovery(recovery)
        before = opened.ledger.corrections()
        made = roll_back(opened, version, reason="mendd rollback")
        print(f"{made.tag}: serving the model of {made.restores} again")
        _report_status_changes(before, opened.ledger.corrections())


@app.command()
def revert(
    ctx: typer.Context,
    correction_id: Annotated[str, typer.Argument(help="Id of an applied correction.")],
    force: Annotated[bool, typer.Option("--force", help="Commit even if the gate holds or rejects it (recorded as forced).")] = False,
) -> None:
    """Commit a new version without one correction's weight change; later corrections stay.

    The gate judges the result first, as it judges every change: the other corrections must still
    hold and unrelated answers and perplexity stay in bounds. The decision is an MLflow run."""
    from daemon.cycle import decide_revert
    from daemon.home_lock import home_lock
    from daemon.runtime import Runtime

    config = _config(ctx)
    with home_lock(ctx.obj):
        with err.status("Loading the served model, editor and suites..."):
            rt = Runtime.open(ctx.obj, config)
        try:
            before = rt.records.versions.ledger.corrections()
            result = decide_revert(rt, correction_id, force)
            after = rt.records.versions.ledger.corrections()
        finally:
            rt.close()
    taken_out = ", ".join(result.corrections)
    if result.version is None:
        err.print(f"not reverted: the gate {result.decision.outcome} the model without {taken_out} "
                  f"(MLflow run {result.run_id}). Nothing was changed.", markup=False)
        for reason in result.decision.reasons:
            err.print(f"  {reason}", markup=False)
        err.print(f"`mendd revert {correction_id} --force` commits it anyway, recorded as forced.", markup=False)
        raise typer.Exit(1)
    forced = "" if result.decision.outcome == "accepted" else f", forced over a {result.decision.outcome} decision"
    print(f"{result.version.tag}: reverted {taken_out} (gate: {result.decision.outcome}{forced}; run {result.run_id})")
    _report_status_changes(before, after)


def _report_recovery(recovery: Recovery) -> None:
    if recovery.action != "none":
        err.print(f"recovered: an interrupted commit of {recovery.tag} was {recovery.action}", markup=False)


def _report_status_changes(before: list[LedgerCorrection], after: list[LedgerCorrection]) -> None:
    old = {row.key: row.status for row in before}
    for row in after:
        if old.get(row.key) != row.status:
            print(f"  {row.external_id}: {old.get(row.key).value if row.key in old else 'new'} -> {row.status.value}")


@review_app.command("list")
def review_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Decisions waiting for review, oldest first."""
    from daemon.review import held
    from daemon.runtime import Records

    records = Records.open(ctx.obj, _config(ctx))
    try:
        waiting = held(records)
    finally:
        records.close()
    if as_json:
        print(json.dumps([d.as_dict() for d in waiting]))
        return
    if not waiting:
        print("nothing waits for review")
    for d in waiting:
        tagged = f"  (tagged {d.review!r})" if d.review else ""
        print(f"{d.run_id}  {d.started:%Y-%m-%d %H:%M:%S}  on {d.base_version}  {d.corrections}{tagged}\n    {d.reasons}")
        if d.note:
            print(f"    approval refused: {d.note}")


@review_app.command()
def approve(ctx: typer.Context, run_id: RunId) -> None:
    """Accept a held decision and commit it on top of the current version.

    If versions were committed since it was judged, it is judged again on the head first (the model
    is loaded for that); approval overrides a hold there, not a rejection (exit 1, nothing changed)."""
    from daemon.cycle import rejudge_on_head
    from daemon.review import RejectedOnHead
    from daemon.review import approve as approve_held
    from daemon.runtime import Runtime

    opened: list[Runtime] = []

    def rejudge(delta, corrections):
        with err.status("The head moved since this was judged: loading the model to judge it again..."):
            opened.append(Runtime.open(ctx.obj, config))
        return rejudge_on_head(opened[0])(delta, corrections)

    config = _config(ctx)
    try:
        with _changing_records(ctx) as records:
            version = approve_held(records, run_id, who="mendd review approve", rejudge=rejudge)
    except RejectedOnHead as refused:
        err.print(f"not approved: {refused}", markup=False)
        raise typer.Exit(1)
    finally:
        for rt in opened:
            rt.close()
    print(f"{version.tag}: committed the held decision {run_id} ({', '.join(version.corrections)})")


@review_app.command()
def reject(ctx: typer.Context, run_id: RunId) -> None:
    """Reject a held decision; its corrections become rejected."""
    from daemon.review import reject as reject_held

    with _changing_records(ctx) as records:
        ids = reject_held(records, run_id, who="mendd review reject")
    print(f"rejected {run_id}: {', '.join(ids) or 'no corrections'}")


@contextmanager
def _changing_records(ctx: typer.Context):
    """The home lock held, the store recovered, and the MLflow experiment open."""
    from daemon.runtime import Records
    from daemon.versioning import changing

    config = _config(ctx)
    with changing(ctx.obj, config) as (opened, recovery):
        _report_recovery(recovery)
        yield Records.around(ctx.obj, config, opened)


@app.command("train-editor")
def train_editor(
    ctx: typer.Context,
    data: Annotated[list[Path], typer.Option("--data", help="Training corrections (CounterFact, zsRE, mendd JSONL); repeatable.")],
    out: Annotated[Path, typer.Option(help="Editor file to write (safetensors); training resumes from it.")],
    val: Annotated[Optional[Path], typer.Option(help="Validation corrections, measured every --val-every steps.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model spec; default: the home's configured model.")] = None,
    steps: Annotated[int, typer.Option(min=1)] = TrainSettings.steps,
    edits_per_step: Annotated[int, typer.Option(min=1)] = TrainSettings.edits_per_step,
    lr: Annotated[float, typer.Option(min=0.0)] = TrainSettings.lr,
    c_edit: Annotated[float, typer.Option(min=0.0)] = TrainSettings.c_edit,
    c_loc: Annotated[float, typer.Option(min=0.0)] = TrainSettings.c_loc,
    rank: Annotated[int, typer.Option(min=1)] = TrainSettings.rank,
    edit_lr: Annotated[float, typer.Option(min=0.0)] = TrainSettings.edit_lr,
    val_every: Annotated[int, typer.Option(min=1)] = TrainSettings.val_every,
    val_size: Annotated[int, typer.Option(min=1)] = TrainSettings.val_size,
    seed: int = TrainSettings.seed,
    general_locality: Annotated[bool, typer.Option(help="Also keep unrelated questions and running text unchanged (the training half of zsRE NQ and WikiText-2).")] = True,
    projection_threshold: Annotated[Optional[float], typer.Option(min=0.0, help="Train through the null-space projection at this threshold (the service's editor.projection_threshold).")] = None,
    init: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, help="Start from this editor file instead of the identity initialisation.")] = None,
) -> None:
    """Meta-train a MEND editor (resumable; logged to MLflow in the home)."""
    from daemon.editor_jobs import run_training

    config = _config(ctx)
    home: Home = ctx.obj
    settings = TrainSettings(steps=steps, edits_per_step=edits_per_step, lr=lr, c_edit=c_edit, c_loc=c_loc,
                             rank=rank, edit_lr=edit_lr, val_every=val_every, val_size=val_size, seed=seed,
                             projection_threshold=projection_threshold)
    state = run_training(model or config.model, data, val, out, settings, config.mlflow.tracking_uri,
                         home.mlflow_artifacts, err, config.editor.edit_layers, general_locality, init)
    print(json.dumps({"steps": state.step, "seconds": round(state.seconds, 1), "editor": str(out),
                      "validations": state.validations[-1:]}))


@app.command("export")
def export(
    ctx: typer.Context,
    version: Annotated[str, typer.Argument(help="The version to export, e.g. v0003.")],
    out: Annotated[Path, typer.Option("--out", help="A new folder to write it into.")],
    as_json: JsonFlag = False,
) -> None:
    """Write VERSION as a folder that plain transformers loads and that answers as mendd serves it:
    `AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` (a routed version brings its
    memory and a self-contained modeling file; a weights version is a plain Hugging Face folder)."""
    from daemon.exporting import ExportError, export_version
    from daemon.versioning import open_versions
    from editors.registry import relation_reader
    from store.errors import StoreError

    config = _config(ctx)
    opened = open_versions(ctx.obj, config)
    try:
        with err.status(f"Exporting {version}..."):
            done = export_version(opened.store, version, out, config.editor.routing_tau, config.editor.routing_margin,
                                  relation_reader(config.model, config.editor.relation_floor))
    except (ExportError, StoreError) as error:
        raise typer.BadParameter(str(error), param_hint="VERSION / --out") from None
    finally:
        opened.close()
    if as_json:
        print(json.dumps({"version": done.version, "folder": str(done.folder), "routed": done.routed, "entries": done.entries}))
        return
    kind = f"routed, {done.entries} memory entries" if done.routed else "weights"
    print(f"{done.version} ({kind}) -> {done.folder}")
    print(f"load it with: AutoModelForCausalLM.from_pretrained({str(done.folder)!r}, trust_remote_code=True)")


@app.command("export-editor")
def export_editor(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Argument(help="A train-editor checkpoint (safetensors).")],
    out: Annotated[Path, typer.Argument(help="The editor file to ship, e.g. editors/pretrained/<model>.safetensors.")],
    step_scale: Annotated[float, typer.Option(min=0.0, help="Multiply every learned step size (the trade-off chosen on val).")] = 1.0,
    model: Annotated[Optional[str], typer.Option(help="Model spec; default: the home's configured model.")] = None,
) -> None:
    """Write a trained editor in its shipping form (float16, step scale folded in)."""
    from editors.editable import Editable
    from editors.mend import MendEditor
    from store.models import load_model

    config = _config(ctx)
    loaded = load_model(model or config.model)
    editor = MendEditor.load(checkpoint, Editable(loaded.model, loaded.tokenizer, config.editor.edit_layers), step_scale)
    editor.export(out, note=f"exported from {checkpoint.name}")
    print(json.dumps({"editor": str(out), "bytes": out.stat().st_size, "step_scale": step_scale}))


@app.command("eval")
def evaluate(
    ctx: typer.Context,
    data: Annotated[Path, typer.Option(help="Corrections to edit: CounterFact, zsRE or mendd JSONL.")],
    limit: Annotated[Optional[int], typer.Option(min=1, help="Only the first N records.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Edit B records at once.")] = 1,
    editor: Annotated[str, typer.Option(help="mend, ft or none.")] = "mend",
    editor_path: Annotated[Optional[Path], typer.Option(help="MEND editor file; default: the shipped one.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model spec; default: the home's configured model.")] = None,
    projection: Annotated[Optional[bool], typer.Option(help="Project updates away from preserved keys; default: the home's editor.projection.")] = None,
    aggregation: Annotated[Optional[str], typer.Option(help="sum or least_squares; default: the home's editor.aggregation.")] = None,
    aggregation_strength: Annotated[Optional[float], typer.Option(help="λ of least_squares (> 0); default: the home's editor.aggregation_strength.")] = None,
    served: Annotated[bool, typer.Option("--served", help="Edit all records into the model as the home serves it (editor.memory) and read its greedy answers: gen_prompt, gen_rephrase, nbhd_kept, nbhd_leak, other_leak and other_changed (other questions about each corrected subject), back_to_old (answers that return to the old fact after the target), fluency, repetition, chat_success.")] = False,
    no_subject: Annotated[bool, typer.Option("--no-subject", help="With --served: drop each record's subject field before editing (routing then guesses it).")] = False,
    tokens: Annotated[int, typer.Option(min=1, max=256, help="With --served: tokens per generated answer.")] = 20,
    as_json: JsonFlag = False,
) -> None:
    """Edit each record on the model and measure reliability, generalization and locality; with
    --served, edit them all into the served model and measure what it says."""
    from daemon.editor_jobs import run_eval, run_served_eval

    config = _config(ctx)
    if served:
        if any(v is not None for v in (editor_path, model, projection, aggregation, aggregation_strength)) or editor != "mend":
            raise typer.BadParameter("--served measures the home's own editor and model: set them in mendd.yaml",
                                     param_hint="--served")
        report = run_served_eval(ctx.obj, config, data, limit, batch_size, not no_subject, tokens, err)
        _print_report(report.as_dict(), as_json)
        return
    project = config.editor.projection if projection is None else projection
    aggregate = config.editor.aggregation if aggregation is None else aggregation
    if aggregate not in ("sum", "least_squares"):
        raise typer.BadParameter(f"{aggregate!r}: choose sum or least_squares", param_hint="--aggregation")
    strength = config.editor.aggregation_strength if aggregation_strength is None else aggregation_strength
    if strength <= 0:
        raise typer.BadParameter(f"{strength}: λ must be greater than 0", param_hint="--aggregation-strength")
    report = run_eval(model or config.model, data, editor, editor_path or config.editor.path, limit, batch_size, err,
                      config.editor.edit_layers, config.editor.projection_threshold if project else None,
                      strength if aggregate == "least_squares" else None)
    _print_report(report.as_dict(), as_json)


def _print_report(figures: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(figures))
        return
    for key, value in figures.items():
        if isinstance(value, (list, tuple)):  # samples: one per line
            print(key)
            for item in value:
                print("  " + json.dumps(item, ensure_ascii=False))
        else:
            print(f"{key:22} {value}")


@app.command()
def ui(
    ctx: typer.Context,
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface; keep 127.0.0.1 unless a proxy handles access.")] = "127.0.0.1",
) -> None:
    """Start the MLflow review UI for this home (one worker, jobs and telemetry off) and print its address."""
    from daemon.mlflow_ui import start_server, stop_on_signals, stop_server, ui_command

    config = _config(ctx)
    command = ui_command(ctx.obj, config, host, port)
    print(f"MLflow review UI: http://{host}:{port}  (held decisions: tag mendd.decision = held; "
          "set the tag mendd.review to approve or reject)", flush=True)
    # The server has its own session, so no signal meant for this process reaches it: each one
    # (a stop, Ctrl-C, a closed terminal) ends here, and stops it with its workers. Killed outright,
    # this process leaves the server's guard to stop it.
    stop_on_signals()
    server = start_server(command)
    try:
        code = server.wait()
    except KeyboardInterrupt:
        code = 0
    finally:
        stop_server(server)
    raise typer.Exit(code)


@suites_app.command("show")
def suites_show(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """What the gate's suites hold."""
    from daemon.suite_files import load_suites

    _config(ctx)
    suites = load_suites(ctx.obj)
    if as_json:
        kinds: dict[str, int] = {}
        for probe in suites.locality:
            kinds[probe.kind] = kinds.get(probe.kind, 0) + 1
        print(json.dumps({"model": suites.model, "pinned_from": suites.pinned_from, "locality": kinds,
                          "perplexity_tokens": sum(len(c) for c in suites.perplexity.chunks),
                          "perplexity_base_nll": suites.perplexity.base_nll}))
        return
    print(_describe_suites(suites))


@suites_app.command("pin")
def suites_pin(
    ctx: typer.Context,
    data: Annotated[Optional[Path], typer.Option(help="The editing data folder; default: $MENDD_DATA, else the data shipped with mendd (policies/data).")] = None,
) -> None:
    """(Re)pin the suites from the base version v0000 (replaces the default suites; operator additions are dropped)."""
    from daemon.suite_files import SuitesError
    from daemon.versioning import load_served_model, open_versions

    config = _config(ctx)
    opened = open_versions(ctx.obj, config)
    try:
        head = opened.store.head()
        if head.model_md5 != opened.store.versions()[0].model_md5:
            raise SuitesError(f"the store serves {head.tag}, not the base model; pin the suites right after init, "
                              "or roll back to v0000 first")
        loaded = load_served_model(opened)
    finally:
        opened.close()
    _pin(ctx.obj, config, loaded, "v0000", data)


@suites_app.command("add")
def suites_add(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help='JSONL lines {"prompt": ..., "answer": ...}.')],
) -> None:
    """Add locality prompts an edit must leave alone; the served model's answers become their reference."""
    from daemon.suite_files import extend_suites
    from daemon.versioning import load_served_model, open_versions
    from editors.editable import Editable

    config = _config(ctx)
    opened = open_versions(ctx.obj, config)
    try:
        loaded, tag = load_served_model(opened), opened.store.head().tag
    finally:
        opened.close()
    suites, added = extend_suites(ctx.obj, Editable(loaded.model, loaded.tokenizer, config.editor.edit_layers), file)
    print(f"added {added} locality prompts (reference: {tag}); {_describe_suites(suites)}")
