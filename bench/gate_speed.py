"""How fast is the gate, and what does prefix caching buy? Prints one JSON object.

The default suites are pinned from the default model (>= 500 locality prompts, the WikiText-2
perplexity sample); the retention set is --retained CounterFact val records (prompt and rephrasing)
treated as committed corrections. Each of --n candidates (a MEND edit of one val record) is judged
twice, by a gate whose suite prefixes are cached (as the service keeps them) and by one that runs
every layer for every sequence each time. speedup = uncached median / cached median, both measured
in this run; the decisions and figures must be identical.

    python bench/gate_speed.py [--n 5] [--retained 50] [--threads 1]
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
from editors.registry import make_editor
from editors.settings import NO_CACHES
from policies.gate import Gate
from policies.policy import load_policy
from policies.probes import data_dir
from policies.suites import pin
from store.models import load_model


def timed_judge(gate: Gate, current, candidate, corrections, retained):
    started = time.perf_counter()
    decision = gate.judge(current, candidate, corrections, retained)
    return time.perf_counter() - started, decision


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--retained", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model(args.model)
    cached = Editable(loaded.model, loaded.tokenizer)
    uncached = Editable(loaded.model, loaded.tokenizer, budgets=NO_CACHES)
    started = time.perf_counter()
    suites = pin(cached, args.model, "v0000", data_dir())
    pin_seconds = time.perf_counter() - started
    policy = load_policy()
    gates = {"cached": Gate(cached, suites, policy), "uncached": Gate(uncached, suites, policy)}

    records, _ = load_corrections(data_dir() / "counterfact" / "val.json", limit=args.retained + args.n)
    retained, edited = records[: args.retained], records[args.retained :]
    editor = make_editor("mend", cached, args.model)
    current = cached.weights()
    seconds: dict[str, list[float]] = {"cached": [], "uncached": []}
    same = True
    outcomes = []
    for correction in edited:
        delta = editor.propose(cached, [correction])
        candidate = {n: current[n] + t for n, t in delta.tensors().items()}
        decisions = {}
        for name, gate in gates.items():
            elapsed, decisions[name] = timed_judge(gate, current, candidate, [correction], retained)
            seconds[name].append(elapsed)
        a, b = decisions["cached"], decisions["uncached"]
        same &= a.outcome == b.outcome and all(abs(a.metrics[k] - b.metrics[k]) < 1e-4 for k in a.metrics)
        outcomes.append(a.outcome)
    cached_median, uncached_median = statistics.median(seconds["cached"]), statistics.median(seconds["uncached"])
    print(json.dumps({
        "model": args.model,
        "threads": args.threads,
        "n": len(edited),
        "locality_prompts": len(suites.locality),
        "retention_prompts": sum(1 + len(c.rephrases) for c in retained),
        "perplexity_tokens": sum(len(c) - 1 for c in suites.perplexity.chunks),
        "pin_seconds": round(pin_seconds, 2),
        "gate_seconds_cached_median": round(cached_median, 3),
        "gate_seconds_uncached_median": round(uncached_median, 3),
        "speedup": round(uncached_median / cached_median, 2),
        "identical_decisions": same,
        "outcomes": outcomes,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }))


if __name__ == "__main__":
    main()
