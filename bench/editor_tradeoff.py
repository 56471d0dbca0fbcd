"""The editor's reliability/locality trade-off on CounterFact val: one row per (editor file, step scale).

The step scale multiplies every learned step size α_l at edit time, so one trained editor gives a
whole curve; editors trained with different locality weights c_loc give further curves. Prints JSON
(one object with a row list) and writes a PNG plot.

    python bench/editor_tradeoff.py --editor A.safetensors --editor B.safetensors --scales 0.5 0.75 1 1.25 \
        --n 50 --png bench/results/tradeoff.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from daemon.editor_jobs import make_probes  # noqa: E402
from editors.editable import Editable  # noqa: E402
from editors.formats import load_corrections  # noqa: E402
from editors.mend import MendEditor  # noqa: E402
from policies.editing_eval import evaluate_editor  # noqa: E402
from policies.probes import data_dir  # noqa: E402
from store.models import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--editor", action="append", type=Path, required=True)
    parser.add_argument("--scales", nargs="+", type=float, default=[0.5, 0.75, 1.0, 1.25])
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--offset", type=int, default=0, help="skip the first records of val")
    parser.add_argument("--png", type=Path)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model("smollm2-135m")
    editable = Editable(loaded.model, loaded.tokenizer)
    records, _ = load_corrections(data_dir() / "counterfact" / "val.json", limit=args.offset + args.n)
    records = records[args.offset :]
    probes = make_probes(editable)
    rows = []
    for path in args.editor:
        for scale in args.scales:
            editor = MendEditor.load(path, editable, step_scale=scale)
            report = evaluate_editor(editable, editor, records, probes).as_dict()
            rows.append({"editor_file": str(path), "step_scale": scale, **report})
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"n": args.n, "rows": rows}))
    if args.png:
        figure, axis = plt.subplots(figsize=(6, 4))
        for path in args.editor:
            mine = [r for r in rows if r["editor_file"] == str(path)]
            axis.plot([r["neighborhood"] for r in mine], [r["reliability"] for r in mine], "o-", label=f"{path.parent.name} rel.")
            axis.plot([r["neighborhood"] for r in mine], [r["generalization"] for r in mine], "s--", label=f"{path.parent.name} gen.")
            for r in mine:
                axis.annotate(f"×{r['step_scale']}", (r["neighborhood"], r["reliability"]), fontsize=7)
        axis.set_xlabel("neighborhood (pre/post agreement)")
        axis.set_ylabel("edit success")
        axis.set_title(f"MEND trade-off on CounterFact val (n={args.n})")
        axis.legend(fontsize=7)
        figure.tight_layout()
        args.png.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(args.png, dpi=120)


if __name__ == "__main__":
    main()
