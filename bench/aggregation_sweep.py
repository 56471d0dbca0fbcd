"""How a batch's MEND updates become one change: summed, or aggregated by least squares (with
strength λ, with or without the null-space projection, with or without the extra key contexts, at
a step scale). Each configuration edits the first --n CounterFact val records in batches of
--batch on SmolLM2-135M and is measured per batch against the unedited model (policies/editing_eval).
Prints one JSON object: a row per configuration.

    python bench/aggregation_sweep.py [--n 40] [--batch 10] [--configs sum sum+proj lsq:10 lsq:100:ctx ...]

A configuration is `sum`, `sum+proj`, or `lsq:<λ>[:ctx][:proj][:x<scale>]`.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from daemon.suite_files import preserved_covariance
from editors.aggregation import CONTEXTS, LeastSquaresEditor
from editors.editable import Editable
from editors.formats import load_corrections
from editors.mend import MendEditor
from editors.projection import null_space_projectors, projected
from editors.registry import pretrained_path
from policies.editing_eval import Probes, evaluate_editor
from policies.probes import data_dir, unrelated_prompts, wikitext_chunks
from store.models import load_model

DEFAULT = ["sum", "sum+proj", "lsq:1", "lsq:10", "lsq:100", "lsq:1000", "lsq:10:proj", "lsq:10:ctx", "lsq:100:ctx",
           "lsq:100:ctx:x2"]
KEYS = ("reliability", "generalization", "neighborhood", "locality", "ppl_drawdown", "edit_seconds_median")


def build(config: str, editable: Editable, covariance: dict, threshold: float):
    parts = config.split(":")
    scale = next((float(p[1:]) for p in parts if p.startswith("x")), 1.0)
    mend = MendEditor.load(pretrained_path("smollm2-135m"), editable, step_scale=scale)
    if parts[0] == "sum":
        return mend
    if parts[0] == "sum+proj":
        return projected(mend, editable, covariance, threshold)
    projectors = null_space_projectors(covariance, threshold) if "proj" in parts else None
    return LeastSquaresEditor(mend, covariance, float(parts[1]), projectors, CONTEXTS if "ctx" in parts else ("",))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--configs", nargs="+", default=DEFAULT)
    parser.add_argument("--threshold", type=float, default=0.01, help="projection threshold")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = data_dir()
    loaded = load_model("smollm2-135m")
    editable = Editable(loaded.model, loaded.tokenizer)
    covariance = preserved_covariance(editable, root)
    probes = Probes(editable, unrelated_prompts(root, 100, 100, half=0), wikitext_chunks(root, loaded.tokenizer, 4, 128))
    records, _ = load_corrections(root / "counterfact" / "val.json", limit=args.n)
    rows = {}
    for config in args.configs:
        started = time.perf_counter()
        report = evaluate_editor(editable, build(config, editable, covariance, args.threshold), records, probes,
                                 batch_size=args.batch).as_dict()
        rows[config] = {**{k: report[k] for k in KEYS}, "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps({"model": "smollm2-135m", "n": args.n, "batch": args.batch, "projection_threshold": args.threshold,
                      "unrelated_prompts": 200, "rows": rows}))


if __name__ == "__main__":
    main()
