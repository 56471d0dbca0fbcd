"""What routing one query costs as the memory grows (issue #22), on a synthetic memory. Prints JSON.

The served rule itself (editors/memory_model.route_queries: the lead veto, floors, namesakes by
relation) on random unit keys, leads and relations of the default model's width (576), T = 1,000 to
1,000,000 entries, two ways: states only (every key against every query position: `prompt_ms`,
`text_chunk_ms`), and as served, where an entry serves only a query that names its subject and the
subject index (`subject_index`, `named_entries`) picks the entries a query's words name before any
state is compared (`named_prompt_ms`, `named_text_chunk_ms`; every entry has a distinct two-word
subject, the prompt names one of them and the chunk three). Queries are random states: a 10-token
prompt, and a 128-token chunk of running text (the perplexity sample's size). Timed per query
(median of --repeat), on --threads threads, after one warm-up call; the ratios divide by the
first size's time in the same run. The memory's routing tensors (keys, leads, relations in float32)
take 3 x 4 x 576 bytes an entry; the factors are not needed to route.

    python bench/routing_cost.py [--sizes 1000 10000 100000 1000000] [--out bench/results/routing_cost.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from editors.memory_model import index_words, route_queries, subject_index, unit
from report import report

HIDDEN = 576


def timed(call, repeat: int) -> float:
    call()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    centre = torch.zeros(HIDDEN)
    prompt = [torch.randn(10, HIDDEN, generator=generator)]
    text = [torch.randn(128, HIDDEN, generator=generator)]
    rows = {}
    for size in args.sizes:
        keys, leads, relations = (unit(torch.randn(size, HIDDEN, generator=generator), centre) for _ in range(3))
        floors = torch.rand(size, generator=generator) * 0.5

        memory = (centre, keys, leads, relations, floors, 0.75, 0.3)
        subjects = [(f"Person{i} Surname{i % 997}",) for i in range(size)]
        named = (subjects, subject_index([index_words(s) for s in subjects]))
        prompt_text = [f"Where was {subjects[size // 2][0]} born? The answer is"]
        chunk_text = [" ".join(f"In {1900 + k} {subjects[k * size // 3][0]} met others and wrote a long letter home." for k in range(3))]
        rows[str(size)] = {"prompt_ms": round(1000 * timed(lambda: route_queries(prompt, *memory), args.repeat), 3),
                           "text_chunk_ms": round(1000 * timed(lambda: route_queries(text, *memory), args.repeat), 3),
                           "named_prompt_ms": round(1000 * timed(lambda: route_queries(prompt, *memory, prompt_text, *named), args.repeat), 3),
                           "named_text_chunk_ms": round(1000 * timed(lambda: route_queries(text, *memory, chunk_text, *named), args.repeat), 3),
                           "routing_tensors_mb": round(3 * 4 * HIDDEN * size / 1e6, 1)}
        memory = keys = leads = relations = named = None  # freed before the next size's tensors are made
        print(json.dumps({size: rows[str(size)]}), flush=True)
    base = rows[str(args.sizes[0])]
    for row in rows.values():
        row["prompt_ratio_to_first"] = round(row["prompt_ms"] / base["prompt_ms"], 2)
        row["text_ratio_to_first"] = round(row["text_chunk_ms"] / base["text_chunk_ms"], 2)
        row["named_prompt_ratio_to_first"] = round(row["named_prompt_ms"] / base["named_prompt_ms"], 2)
        row["named_text_ratio_to_first"] = round(row["named_text_chunk_ms"] / base["named_text_chunk_ms"], 2)
    summary = {"hidden": HIDDEN, "threads": args.threads, "first": args.sizes[0], "sizes": rows}
    report(summary, args.out)


if __name__ == "__main__":
    main()
