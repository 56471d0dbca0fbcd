"""Continual editing through the real cycle: T corrections, measured every --every on the served model.

Each row streams the same CounterFact val records into its own temporary home (SmolLM2-135M,
git+DVC store, SQLite ledger, MLflow on SQLite) and runs cycles of --batch corrections until none
is pending, exactly as the service does (propose -> gate -> MLflow -> commit, rejected batches
bisected). Every --every corrections it measures the served model:
  reliability, generalization  over every correction accepted so far (prompts; rephrasings)
  locality                     the gate suite's 733 unrelated prompts against the base model
  ppl_drawdown                 WikiText-2 sample against the base model
  acceptance                   accepted / submitted (held counts as not accepted: nobody reviews here)
  text_routed                  routed memory: the share of the perplexity sample's 128-token chunks an entry serves
  text_routed_heldout          the same over 64 other chunks of WikiText-2 test (its measuring half, before the
                               perplexity sample): 8 chunks can only say 0, 0.125, 0.25...
  seconds_per_decision         the chunk's cycle time over its decisions (the cost per decision as T grows)
  memory_bytes, rss_bytes      model/memory/ on disk; this process's resident memory
  cache_bytes, tensor_bytes    of which the editable's caches hold (each bounded), and every live tensor
  other_leak, other_changed    other questions about the subjects of the corrections accepted so far (two a
                               correction, policies/relations.py; those of up to 500 of them, drawn with a
                               fixed seed): the share whose served answer says the correction's target where
                               the base weights' did not / whose first 4 words differ from the base's (issue #35)
Past CounterFact val's 1,919 records the stream goes on with train (the shipped editor was
meta-trained on those: reliability and generalization there are optimistic).

Rows (batches of --batch unless the row sets its own):
  mend-nogate  plain MEND, every batch applied, no gate (in memory; no store)
  mend         plain MEND, the default gate
  ft           the fine-tuning baseline, the default gate
  mendd-lsq    MEND with least-squares aggregation (editor.aggregation), the default gate
  mendd-weights  editor.memory weights (edits summed into the weights; called `mendd` before the
               routed memory was built): one correction per decision, updates projected away from the
               preserved keys, the default gate
  mendd-routed mendd's defaults for SmolLM2 (`mendd init` writes them): editor.memory routed
               (editors/routing.py), each accepted correction kept as its own update with a key, the
               weights unchanged; projection on, the default gate; the reported `final`

Resumable: each row's home and progress live under --work (default bench/work/continual, ignored by
git, so it survives a restart); run it again to go on where it stopped, to the decision.
Prints one JSON object, writes it and a PNG of the curves to --out, and logs both to MLflow.

    python bench/continual.py [--quick] [--n 1000] [--rows mend-nogate mend ft mendd] [--work DIR]
    nohup python bench/continual.py --n 10000 --every 1000 --rows mendd-routed &   # issue #22
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from daemon.config import load_config
from daemon.cycle import run_cycle
from daemon.feeds import enqueue
from daemon.home import Home
from daemon.home_lock import home_lock
from daemon.provision import provision_home
from daemon.runtime import Runtime
from daemon.suite_files import load_suites
from editors.batching import text_batch
from editors.editable import Editable
from editors.formats import from_record, load_corrections
from editors.registry import make_editor
from editors.routing import NONE, Routed
from editors.types import Correction, apply_delta
from policies.editing_eval import served_accuracy
from policies.gate import Gate, PinnedAnswers, ReusingBase, Weights
from policies.policy import load_policy
from policies.probes import PERPLEXITY_FROM_LINE, data_dir, token_chunks, wikitext_lines
from policies.relations import OtherQuestion
from policies.served_eval import OTHER_SEED, TOKENS, Served, other_question_figures, other_questions_for
from store.ledger_schema import CorrectionStatus
from store.models import load_model

MODEL = "smollm2-135m"
FEED = "continual"
WEIGHTS = {"memory": "weights"}
ROWS = {  # row -> settings for its home's mendd.yaml (batch_size: --batch unless set here)
    "mend-nogate": {"editor": {"name": "mend", "projection": False, **WEIGHTS}},
    "mend": {"editor": {"name": "mend", "projection": False, **WEIGHTS}},
    "ft": {"editor": {"name": "ft", "projection": False, **WEIGHTS}},
    "mendd-lsq": {"editor": {"aggregation": "least_squares", "aggregation_strength": 100.0, "projection": False, **WEIGHTS}},
    "mendd-weights": {"batch_size": 1, "editor": WEIGHTS},
    "mendd-routed": {"editor": {"memory": "routed"}},
}
BEST = "mendd-routed"
FINAL = ("reliability", "generalization", "locality", "ppl_drawdown", "acceptance", "text_routed", "other_leak",
         "other_changed")
VAL = 1919  # CounterFact val records; the stream goes on with train
OTHER_SAMPLE = 500  # accepted corrections whose other questions a point asks: its cost stays bounded as T grows


@dataclass(frozen=True)
class Point:
    corrections: int  # submitted so far
    accepted: int
    reliability: float | None
    generalization: float | None
    locality: float
    ppl_drawdown: float
    acceptance: float
    seconds: float  # wall time of the row so far (cycles and measurements)
    text_routed: float | None = None  # routed memory: share of the perplexity sample's chunks an entry serves
    text_routed_heldout: float | None = None  # the same over 64 held-out chunks
    seconds_per_decision: float | None = None  # the chunk's cycle time / its decisions (gated rows)
    memory_bytes: int | None = None  # model/memory/ on disk (routed rows)
    rss_bytes: int | None = None  # the bench process's resident memory after the chunk
    cache_bytes: int | None = None  # of which the editable's caches (prefix states, routed outputs, similarities)
    tensor_bytes: int | None = None  # every live tensor's storage (caches, model, memory): the rest is Python and the allocator
    # other questions about accepted corrections' subjects (None: measured before issue #35, or no relation known)
    other_leak: float | None = None
    other_changed: float | None = None


def measure(editable: Editable, gate: Gate, weights: Weights, accepted: list[Correction], submitted: int,
            seconds: float, base: PinnedAnswers, **costs) -> Point:
    """The served model (`weights`, as the gate takes them) measured; `base`: the base weights' answers
    to other questions, kept across the row's points; `costs` as the row saw them."""
    print(f"  caches {editable.cache_bytes()}", file=sys.stderr, flush=True)  # each against its budget
    with torch.no_grad():
        other_leak, other_changed, _ = other_question_figures(
            ReusingBase(Served.of(editable, weights), base), base, accepted, drawn(other_questions_for(accepted)), TOKENS)
        reliability, generalization = served_accuracy(editable, accepted, weights)
        locality, _ = gate.locality(weights)
        ppl = gate.ppl_drawdown(weights)
        routed = gate.text_routed(weights)
        heldout = None
        if isinstance(weights, Routed):
            text = text_batch(token_chunks(wikitext_lines(data_dir())[0:PERPLEXITY_FROM_LINE:2], editable.tokenizer, 64, 128))
            heldout = (editable.routes(text, weights.memory) != NONE).float().mean().item()
    return Point(submitted, len(accepted), _round(reliability), _round(generalization), round(locality, 4),
                 round(ppl, 4), round(len(accepted) / submitted, 4), round(seconds, 1), _round(routed),
                 _round(heldout), rss_bytes=resident_bytes(),
                 cache_bytes=editable.cached_bytes(), tensor_bytes=live_tensor_bytes(lambda line: print(line, file=sys.stderr, flush=True)),
                 other_leak=_round(other_leak), other_changed=_round(other_changed), **costs)


def drawn(questions: list[OtherQuestion], limit: int = OTHER_SAMPLE, seed: int = OTHER_SEED) -> list[OtherQuestion]:
    """The questions about up to `limit` of their corrections: those that rank first by a draw seeded
    with `seed` and the correction's id, so a correction drawn at one point stays drawn at the next
    unless later ones outrank it."""
    ranked = sorted({q.correction_id for q in questions}, key=lambda cid: random.Random(f"{seed}:{cid}").random())
    kept = set(ranked[:limit])
    return [q for q in questions if q.correction_id in kept]


def base_answers(editable: Editable, routed: bool) -> PinnedAnswers:
    """The base weights' answers, kept as they are asked: a routed memory leaves the model's own
    weights as they are; summed-weights rows change them in place, so theirs are the base model's
    tensors, loaded afresh."""
    if routed:
        return PinnedAnswers(Served(editable), limit=None)
    params = dict(load_model(MODEL).model.named_parameters())
    return PinnedAnswers(Served(editable, weights={name: params[name].detach().clone() for name in editable.weights()}),
                         limit=None)


def resident_bytes() -> int:
    """This process's resident memory now (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def live_tensor_bytes(say=None) -> int:
    """The bytes of every tensor storage this process holds (each storage once); `say` is told the
    largest groups by shape (to find what holds them)."""
    storages: dict[int, tuple[int, tuple]] = {}
    with warnings.catch_warnings():  # isinstance on torch's deprecated module proxies warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor):
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = (storage.nbytes(), (tuple(obj.shape), obj.dtype))
    if say is not None:
        groups: dict[tuple, list[int]] = {}
        for size, shape in storages.values():
            groups.setdefault(shape, []).append(size)
        for shape, sizes in sorted(groups.items(), key=lambda g: -sum(g[1]))[:15]:
            say(f"  tensors {shape}: {len(sizes)} storages, {sum(sizes) / 1e6:.1f} MB")
    return sum(size for size, _ in storages.values())


def tree_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0


class Progress:
    """A row's measurements so far, kept beside its home so a stopped run goes on."""

    def __init__(self, path: Path):
        self.path = path
        saved = json.loads(path.read_text()) if path.exists() else {}
        self.points = [Point(**p) for p in saved.get("points", [])]
        self.chunk = Chunk(**saved.get("chunk", {}))

    @property
    def done(self) -> int:
        return self.points[-1].corrections if self.points else 0

    @property
    def seconds(self) -> float:
        return self.points[-1].seconds if self.points else 0.0

    def add(self, point: Point) -> None:
        self.points.append(point)
        self.chunk = Chunk()
        self._write()

    def _write(self) -> None:
        partial = self.path.with_suffix(".tmp")
        partial.write_text(json.dumps({"points": [asdict(p) for p in self.points], "chunk": asdict(self.chunk)}))
        partial.replace(self.path)

    def spent(self, seconds: float, cycling: float, decisions: int) -> None:
        """Time spent on the chunk in progress, kept after every cycle: a run stopped mid-chunk counts
        it when it goes on."""
        self.chunk = Chunk(self.chunk.seconds + seconds, self.chunk.cycling + cycling, self.chunk.decisions + decisions)
        self._write()


@dataclass(frozen=True)
class Chunk:
    """The chunk in progress: wall seconds, seconds in cycles and decisions so far."""

    seconds: float = 0.0
    cycling: float = 0.0
    decisions: int = 0


def run_gated(row: str, work: Path, template: Home, records: list[Correction], args, say) -> list[Point]:
    """Stream `records` through the real cycle in the row's home, measuring every args.every."""
    home = Home(work / row)
    progress = Progress(work / f"{row}.progress.json")
    if not home.config_path.exists():
        provision_home(home, MODEL, settings={"batch_size": args.batch, **ROWS[row]}, suites_from=template)
    with home_lock(home):  # as the service holds it: a second run on this home waits, then stops
        return _run_gated(row, home, progress, records, args, say)


def _run_gated(row: str, home: Home, progress: "Progress", records: list[Correction], args, say) -> list[Point]:
    rt = Runtime.open(home, load_config(home))
    try:
        ledger = rt.records.versions.ledger
        # corrections submitted beyond the last measurement are decided now, then measured with the next chunk
        submitted = sum(1 for row_ in ledger.corrections() if row_.feed == FEED)
        base = base_answers(rt.editable, rt.memory is not None)
        for start in range(progress.done, len(records), args.every):
            mark = time.perf_counter()
            end = min(start + args.every, len(records))
            if submitted < end:
                enqueue(ledger, records[submitted:end], FEED)
                submitted = end
            while ledger.pending(1):
                cycle_started = time.perf_counter()
                decisions = sum(step.decision is not None for step in run_cycle(rt).steps)
                now = time.perf_counter()
                progress.spent(now - mark, now - cycle_started, decisions)
                mark = now
            chunk = progress.chunk
            per_decision = chunk.cycling / chunk.decisions if chunk.decisions else None
            accepted = _accepted(rt)
            point = measure(rt.editable, rt.gate, rt.served_weights(), accepted, end,
                            progress.seconds + chunk.seconds + time.perf_counter() - mark, base,
                            seconds_per_decision=_round(per_decision),
                            memory_bytes=tree_bytes(rt.records.versions.store.memory_dir) if rt.memory is not None else None)
            progress.add(point)
            say(row, point)
    finally:
        rt.close()
    return progress.points


def _accepted(rt: Runtime) -> list[Correction]:
    """Every applied correction: carried by a version, or already answered as asked (no weight change)."""
    rows = rt.records.versions.ledger.corrections(CorrectionStatus.applied)
    return [from_record(r.external_id, r.payload, r.feed) for r in rows]


def run_ungated(row: str, work: Path, template: Home, records: list[Correction], args, say) -> list[Point]:
    """Plain MEND applied batch after batch with no gate and no store: the collapse to compare with.
    In memory, so a stopped run starts this row again."""
    progress = Progress(work / f"{row}.progress.json")
    if progress.done >= len(records):
        return progress.points
    progress.points.clear()
    loaded = load_model(MODEL)
    editable = Editable(loaded.model, loaded.tokenizer)
    editor = make_editor("mend", editable, MODEL)
    gate = Gate(editable, load_suites(template), load_policy(None))
    base = base_answers(editable, routed=False)
    started = time.perf_counter()
    for start in range(0, len(records), args.every):
        chunk = records[start : start + args.every]
        for i in range(0, len(chunk), args.batch):
            apply_delta(loaded.model, editor.propose(editable, chunk[i : i + args.batch]))
        point = measure(editable, gate, editable.weights(), records[: start + len(chunk)], start + len(chunk),
                        time.perf_counter() - started, base)
        progress.add(point)
        say(row, point)
    return progress.points


def plot(rows: dict[str, list[Point]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {m: (lambda p, m=m: getattr(p, m)) for m in (
        "reliability", "generalization", "locality", "ppl_drawdown", "acceptance", "text_routed", "text_routed_heldout",
        "other_leak", "other_changed", "seconds_per_decision")}
    panels["MB per 1,000 entries"] = lambda p: p.memory_bytes / 1e3 / p.accepted if p.memory_bytes and p.accepted else None
    panels["resident GB"] = lambda p: p.rss_bytes / 1e9 if p.rss_bytes else None
    panels = {name: value for name, value in panels.items() if any(value(p) is not None for ps in rows.values() for p in ps)}
    # the bars for T = 1,000 (issue #13), and for T = 10,000 (issue #22) where the run goes that far
    long = max((p.corrections for ps in rows.values() for p in ps), default=0) > 1000
    bars = {"reliability": 0.95 if long else 0.90, "generalization": 0.80 if long else 0.75, "locality": 0.95,
            "ppl_drawdown": 0.02 if long else 0.05, "acceptance": 0.90 if long else 0.80, "text_routed": 0.10,
            "text_routed_heldout": 0.10, "MB per 1,000 entries": 25.0,
            "other_leak": 0.05, "other_changed": 0.15}  # issue #35's bars
    columns = min(len(panels), 5)
    grid_rows = -(-len(panels) // columns)
    figure, grid = plt.subplots(grid_rows, columns, figsize=(4 * columns, 3.6 * grid_rows), squeeze=False)
    axes = list(grid.flat)
    for spare in axes[len(panels):]:
        spare.set_visible(False)
    for axis, (metric, value) in zip(axes, panels.items()):
        for row, points in rows.items():
            shown = [(p.corrections, value(p)) for p in points if value(p) is not None]
            axis.plot([x for x, _ in shown], [y for _, y in shown], marker="o", label=row)
            if metric == "seconds_per_decision" and long and shown:  # issue #22: at most 1.5x its T = 1,000 figure
                axis.axhline(1.5 * shown[0][1], color="grey", linestyle="--", linewidth=1)
            if metric == "resident GB":
                cached = [(p.corrections, p.cache_bytes / 1e9) for p in points if p.cache_bytes]
                axis.plot([x for x, _ in cached], [y for _, y in cached], marker="x", linestyle=":", label=f"{row}: caches")
                axis.legend(fontsize="small")
        if metric in bars:
            axis.axhline(bars[metric], color="grey", linestyle="--", linewidth=1)
        if metric == "ppl_drawdown":  # a collapsed row reaches 1e9 and more: log scale past 1%
            axis.set_yscale("symlog", linthresh=0.01)
            axis.set_ylim(bottom=-0.01)
        axis.set_title(metric)
        axis.set_xlabel("corrections submitted")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def log_to_mlflow(uri: str, summary: dict, json_path: Path, png_path: Path, rows: dict[str, list[Point]]) -> str:
    import mlflow
    from mlflow.entities import Metric, Param

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("mendd-bench/continual")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("mendd-bench/continual")
    run = client.create_run(experiment_id, run_name=f"continual-T{summary['T']}")
    params = {"T": summary["T"], "batch": summary["batch"], "every": summary["every"], "model": MODEL, "rows": ",".join(rows)}
    metrics = [Metric(f"{row}.{name}", getattr(p, name), int(time.time() * 1000), p.corrections)
               for row, points in rows.items() for p in points
               for name in (*FINAL, "text_routed_heldout", "seconds_per_decision", "memory_bytes", "rss_bytes", "cache_bytes", "tensor_bytes")
               if getattr(p, name) is not None]
    client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
    client.log_artifact(run.info.run_id, str(json_path))
    client.log_artifact(run.info.run_id, str(png_path))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def streamed(n: int) -> list[Correction]:
    """The first `n` corrections of the stream: CounterFact val, then train (the shipped editor was
    meta-trained on train: reliability and generalization there are optimistic; locality, perplexity,
    routing and cost are what a run that long measures)."""
    records, _ = load_corrections(data_dir() / "counterfact" / "val.json", limit=n)
    if len(records) < n:
        more, _ = load_corrections(data_dir() / "counterfact" / "train.json", limit=n - len(records))
        records += more
    return records


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="100 corrections (T=100)")
    parser.add_argument("--n", type=int, default=1000, help="T: corrections streamed")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "work" / "continual")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--tracking-uri", default=None, help="default: sqlite under --work")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", action="store_true",
                        help="run nothing: write the JSON, plot and MLflow run from the rows' progress so far")
    args = parser.parse_args()
    # a run started with `nohup ... &` ignores SIGINT: `kill` (SIGTERM) stops it as Ctrl-C would,
    # between two statements, so the home is closed (a cycle in flight is decided again on resume)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.quick:
        args.n, args.every = 100, min(args.every, 50)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    records = streamed(args.n)

    def say(row: str, p: Point) -> None:
        print(f"[{row}] T={p.corrections} accepted={p.accepted} rel={p.reliability} gen={p.generalization} "
              f"loc={p.locality} ppl={p.ppl_drawdown} acc={p.acceptance} other_leak={p.other_leak} "
              f"other_changed={p.other_changed} {p.seconds:.0f}s", file=sys.stderr, flush=True)

    template = Home(args.work / "template")
    if not template.suites_path.exists() and not args.report:
        provision_home(template, MODEL)
    results: dict[str, list[Point]] = {}
    for row in args.rows:
        if args.report:
            points = Progress(args.work / f"{row}.progress.json").points
            if points:
                results[row] = points
            continue
        run = run_ungated if row == "mend-nogate" else run_gated
        results[row] = run(row, args.work, template, records, args, say)

    tag = "quick" if args.quick else f"T{args.n}"
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / f"continual_{tag}.json", args.out / f"continual_{tag}.png"
    last = {row: asdict(points[-1]) for row, points in results.items()}
    summary = {
        "T": args.n, "batch": args.batch, "every": args.every, "model": MODEL,
        "threads": None if args.report else args.threads,  # a report only reads what earlier runs measured
        "final": {k: last[BEST][k] for k in FINAL} if BEST in last else None,
        "stream": f"CounterFact val ({VAL} records), then train: past {VAL} the editor's own training records",
        "final_row": BEST, "last": last,
        "complete": {row: points[-1].corrections >= args.n for row, points in results.items()},
        "curves": {row: [asdict(p) for p in points] for row, points in results.items()},
        "wall_seconds": {row: points[-1].seconds for row, points in results.items()},
    }
    json_path.write_text(json.dumps(summary, indent=1))
    plot(results, png_path)
    summary["mlflow_run"] = log_to_mlflow(args.tracking_uri or f"sqlite:///{args.work / 'mlflow.db'}", summary,
                                          json_path, png_path, results)
    print(json.dumps({k: v for k, v in summary.items() if k != "curves"}))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


if __name__ == "__main__":
    main()
