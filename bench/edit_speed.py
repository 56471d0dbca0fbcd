"""How fast is a MEND edit? Prints one JSON object.

edit_over_fwdbwd: the median time of one MEND edit (proposal from a cold prefix cache, as a fresh
correction would be) divided by the median time of one full forward+backward pass of the base
model on the same prompt+target, both measured here, in this run.

    python bench/edit_speed.py [--model smollm2-135m] [--n 30] [--train-steps 10]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from editors.editable import Editable
from editors.formats import load_corrections
from editors.mend import MendEditor
from editors.registry import make_editor
from editors.settings import TrainSettings
from editors.training import meta_loss
from policies.probes import data_dir
from store.models import load_model


def full_forward_backward(model, tokenizer, prompt: str, target: str) -> float:
    ids = tokenizer(prompt + " " + target, return_tensors="pt").input_ids
    started = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    elapsed = time.perf_counter() - started
    model.zero_grad(set_to_none=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--train-steps", type=int, default=10)
    args = parser.parse_args()

    loaded = load_model(args.model)
    records, _ = load_corrections(data_dir() / "counterfact" / "val.json", limit=args.n + 16 * 4)
    singles, batch_records = records[: args.n], records[args.n :]

    # reference: full passes with every parameter trainable, as plain fine-tuning would run them
    loaded.model.requires_grad_(True)
    for _ in range(2):  # warm-up
        full_forward_backward(loaded.model, loaded.tokenizer, singles[0].prompt, singles[0].target_new)
    reference = [full_forward_backward(loaded.model, loaded.tokenizer, c.prompt, c.target_new) for c in singles]
    loaded.model.requires_grad_(False)

    editable = Editable(loaded.model, loaded.tokenizer)
    editor = make_editor("mend", editable, args.model)
    editor.propose(editable, singles[:1])  # warm-up
    edit_times = []
    for correction in singles:
        editable.clear_cache()  # a fresh correction: its prefix has never been computed
        started = time.perf_counter()
        editor.propose(editable, [correction])
        edit_times.append(time.perf_counter() - started)

    batch_times = []
    for i in range(0, len(batch_records), 16):
        chunk = batch_records[i : i + 16]
        editable.clear_cache()
        started = time.perf_counter()
        editor.propose(editable, chunk)
        batch_times.append((time.perf_counter() - started, len(chunk)))

    trainee = MendEditor.fresh(editable, model_spec=args.model)
    trainee.network.train()
    optimizer = torch.optim.Adam(trainee.network.parameters(), lr=1e-4)
    settings = TrainSettings()
    pool = [c for c in records if c.rephrases and c.locality_prompts]
    started = time.perf_counter()
    for step in range(args.train_steps):
        chosen = [pool[(step * 4 + k) % len(pool)] for k in range(settings.edits_per_step)]
        unrelated = [pool[(step * 4 + k + 7) % len(pool)] for k in range(settings.edits_per_step)]
        loss, _ = meta_loss(editable, trainee, chosen, unrelated, settings)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    train_seconds = time.perf_counter() - started

    edit_median = statistics.median(edit_times)
    fwdbwd_median = statistics.median(reference)
    print(json.dumps({
        "model": args.model,
        "n": len(singles),
        "threads": torch.get_num_threads(),
        "edit_seconds_median": round(edit_median, 4),
        "fwdbwd_seconds_median": round(fwdbwd_median, 4),
        "edit_over_fwdbwd": round(edit_median / fwdbwd_median, 3),
        "batch16_edits_per_second": round(sum(n for _, n in batch_times) / sum(t for t, _ in batch_times), 2),
        "train_steps_per_second": round(args.train_steps / train_seconds, 3),
        "train_edits_per_step": settings.edits_per_step,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }))


if __name__ == "__main__":
    main()
