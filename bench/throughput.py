"""Corrections per minute through the whole cycle (propose, gate, MLflow, git+DVC commit, ledger) on
the default model, at several batch sizes, with where the time went. Prints one JSON object.

One temporary home (SmolLM2-135M, shipped editor, default policy, SQLite, MLflow on SQLite, git+DVC
store). For each batch size B, --n fresh CounterFact val records are submitted and cycles run until
none is pending; rejected batches are bisected as in service, so small batches can be faster.

    python bench/throughput.py [--n 16] [--batch-sizes 1 4 16] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from daemon.config import load_config
from daemon.cycle import run_cycle
from daemon.feeds import enqueue
from daemon.home import Home
from daemon.provision import provision_home
from daemon.runtime import Runtime
from editors.formats import load_corrections
from policies.probes import data_dir

STAGES = ("edit", "gate", "tracking", "commit")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    home = provision_home(Home(Path(tempfile.mkdtemp(prefix="mendd-throughput-"))), args.model)
    records, _ = load_corrections(data_dir() / "counterfact" / "val.json", limit=args.n * len(args.batch_sizes))
    rt = Runtime.open(home, load_config(home))
    rows = {}
    try:
        for index, size in enumerate(args.batch_sizes):
            rt.config = rt.config.model_copy(update={"batch_size": size})
            chunk = records[index * args.n : (index + 1) * args.n]
            ledger = rt.records.versions.ledger
            enqueue(ledger, chunk, f"bench-b{size}")
            seconds = dict.fromkeys(STAGES, 0.0)
            decisions, outcomes = 0, {}
            started = time.perf_counter()
            while ledger.pending(1):
                report = run_cycle(rt)
                for step in report.steps:
                    decisions += step.decision is not None
                    if step.decision is not None:
                        outcomes[step.decision.outcome] = outcomes.get(step.decision.outcome, 0) + 1
                    for stage, value in step.seconds.items():
                        seconds[stage] += value
            wall = time.perf_counter() - started
            final = {s: 0 for s in ("applied", "rejected", "held")}
            for row in ledger.corrections():
                if row.feed == f"bench-b{size}" and row.status.value in final:
                    final[row.status.value] += 1
            rows[str(size)] = {
                "corrections": len(chunk), "wall_seconds": round(wall, 1),
                "corrections_per_minute": round(60 * len(chunk) / wall, 2),
                "decisions": decisions, "decision_outcomes": outcomes, "final_status": final,
                "share": {stage: round(value / wall, 3) for stage, value in seconds.items()},
            }
    finally:
        rt.close()
    print(json.dumps({
        "model": args.model, "threads": args.threads, "home": str(home.root),
        "corrections_per_minute": {size: row["corrections_per_minute"] for size, row in rows.items()},
        "by_batch_size": rows,
    }))


if __name__ == "__main__":
    main()
