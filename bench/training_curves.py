"""An editor-training run's loss curves, read back from MLflow: per-window means as JSON and a PNG.

`mendd train-editor` logs the edit loss, the locality KL and the edit success of every step to its
MLflow run (the run id sits beside the editor file as `<out>.mlflow-run`). Single steps are noisy
(4 edits each), so each point is the mean over a window of steps.

    python bench/training_curves.py --tracking-uri sqlite:///H/mlflow/mlflow.db \
        --run "$(cat E.mlflow-run)" --window 100 --png bench/results/editor_training.png
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

CURVES = ("edit", "loc", "edit_success")


def window_means(history: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    """(last step of the window, mean value) for each full or final window of steps."""
    buckets: dict[int, list[float]] = {}
    for step, value in history:
        buckets.setdefault((step - 1) // window, []).append(value)
    return [((k + 1) * window, statistics.fmean(v)) for k, v in sorted(buckets.items())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--run", required=True, help="MLflow run id of the training run")
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--mark", type=int, action="append", default=[],
                        help="draw a vertical line at this step (where a stage began); repeatable")
    parser.add_argument("--png", type=Path)
    args = parser.parse_args()

    import mlflow

    client = mlflow.MlflowClient(args.tracking_uri)
    curves = {key: window_means(sorted((m.step, m.value) for m in client.get_metric_history(args.run, key)), args.window)
              for key in CURVES}
    print(json.dumps({"run": args.run, "window": args.window,
                      "curves": {k: [{"step": s, "mean": round(v, 4)} for s, v in c] for k, c in curves.items()}}))
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(1, len(CURVES), figsize=(4.5 * len(CURVES), 3.4))
        for axis, key in zip(axes, CURVES):
            axis.plot([s for s, _ in curves[key]], [v for _, v in curves[key]], marker=".")
            for step in args.mark:
                axis.axvline(step, color="grey", linestyle="--", linewidth=1)
            axis.set_title(f"{key} (mean of {args.window} steps)")
            axis.set_xlabel("training step")
        figure.tight_layout()
        figure.savefig(args.png, dpi=110)


if __name__ == "__main__":
    main()
