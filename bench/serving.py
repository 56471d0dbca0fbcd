"""How fast does the OpenAI-compatible endpoint answer (issue #21)? Prints one JSON object.

In one run, on the default model (SmolLM2-135M): plain transformers `generate` (greedy, one prompt
at a time) as the reference, then the real endpoint (daemon/http_api.py over daemon/answering.py,
in this process, spoken to over HTTP with the `openai` package, streamed so that the time to the
first token is seen) with 1 and 4 concurrent clients, with no memory and with a 1,000-entry routed
memory. The memory is the shipped editor's entries for `--distinct` CounterFact val corrections,
repeated to 1,000 (the routing compares against 1,000 keys; each prompt is served by its entry).

- throughput_ratio: endpoint tokens/s (1 client, no memory) / plain generate tokens/s;
- memory_cost: 1 - endpoint tokens/s with the 1,000-entry memory / without (1 client);
- ttft and latency p50/p99 per setting; tokens/s of 4 clients together.

    python bench/serving.py [--home bench/work/served/home] [--prompts 24] [--tokens 32]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import openai
import torch

from daemon.answering import Answering, Snapshot
from daemon.compute import on_own_thread
from daemon.editor_jobs import edit_as_served
from daemon.health import Health
from daemon.home import Home
from daemon.http_api import Api, serve
from daemon.metrics import Metrics
from daemon.provision import base_editable, provisioned
from editors.editable import Editable
from editors.formats import load_corrections
from policies.probes import data_dir
from store.ledger import Ledger

MODEL = "smollm2-135m"
ENTRIES = 1000


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def plain_generate(editable: Editable, prompts: list[str], tokens: int) -> dict:
    """The reference: transformers' own greedy generate, one prompt at a time."""
    produced, started = 0, time.perf_counter()
    with torch.inference_mode():
        for prompt in prompts:
            ids = editable.tokenizer(prompt, return_tensors="pt").input_ids
            out = editable.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                                        pad_token_id=editable.tokenizer.eos_token_id)
            produced += out.shape[1] - ids.shape[1]
    return {"tokens_per_s": round(produced / (time.perf_counter() - started), 2)}


def endpoint(client: openai.OpenAI, prompts: list[str], tokens: int, clients: int) -> dict:
    """`clients` threads, each streaming its share of the prompts one after another."""
    ttft: list[float] = []
    latency: list[float] = []
    produced = [0]
    lock = threading.Lock()

    def ask(mine: list[str]) -> None:
        for prompt in mine:
            started = time.perf_counter()
            first, count = None, 0
            for chunk in client.completions.create(model=MODEL, prompt=prompt, max_tokens=tokens, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}):
                if first is None and chunk.choices and chunk.choices[0].text:
                    first = time.perf_counter() - started
                if chunk.usage is not None:
                    count = chunk.usage.completion_tokens
            done = time.perf_counter() - started
            with lock:
                ttft.append(first if first is not None else done)
                latency.append(done)
                produced[0] += count

    shares = [prompts[i::clients] for i in range(clients)]
    started = time.perf_counter()
    threads = [threading.Thread(target=ask, args=(share,)) for share in shares]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return {"clients": clients, "tokens_per_s": round(produced[0] / elapsed, 2),
            "ttft_p50_s": round(statistics.median(ttft), 4), "ttft_p99_s": round(percentile(ttft, 0.99), 4),
            "latency_p50_s": round(statistics.median(latency), 4), "latency_p99_s": round(percentile(latency, 0.99), 4)}


def prepared(home: Home, args: argparse.Namespace):
    """The model (its editable view), the 1,000-entry memory, the real entries and the prompts."""
    config = provisioned(home, MODEL)
    editable = base_editable(config)
    records, _ = load_corrections(data_dir() / "counterfact" / "val.json", limit=args.distinct)
    print(f"editing {len(records)} corrections for the memory...", file=sys.stderr)
    served, edited = edit_as_served(home, config, editable, records)
    real = served.memory.entries
    entries = tuple(replace(real[i % len(real)], correction_id=f"{real[i % len(real)].correction_id}#{i}")
                    for i in range(ENTRIES))
    return editable, replace(served.memory, entries=entries), real, [c.prompt for c in edited][: args.prompts]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", type=Path, default=Path(__file__).parent / "work" / "serving" / "home")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--distinct", type=int, default=50, help="real entries, repeated to 1,000")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    home = Home(args.home)
    # Torch work on threads that end, as the service runs it (daemon/compute.py): work on the main
    # thread would leave it an idle OpenMP pool that halves the endpoint's speed, not the reference's.
    editable, memory, real, prompts = on_own_thread(lambda: prepared(home, args), "bench-setup")
    on_own_thread(lambda: plain_generate(editable, prompts[:2], args.tokens), "bench-warm-up")
    figures: dict = {"model": MODEL, "prompts": len(prompts), "tokens": args.tokens, "entries": ENTRIES,
                     "distinct_entries": len(real), "threads": args.threads,
                     "plain_generate": on_own_thread(lambda: plain_generate(editable, prompts, args.tokens), "bench-plain")}
    ledger = Ledger(home.ledger_url)  # the API's own; the endpoint does not use it
    try:
        for name, used in (("no_memory", None), ("memory_1000", memory)):
            answers = Answering(on_own_thread(lambda: Snapshot.of("bench", editable, used), "bench-snapshot"))
            server = serve(Api(Health(), dict, Metrics().registry, ledger, home, None, answers, MODEL), "127.0.0.1", 0)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="-",
                                   max_retries=0, timeout=600)
            try:
                endpoint(client, prompts[:2], args.tokens, 1)  # warm-up
                figures[name] = {f"clients_{n}": endpoint(client, prompts, args.tokens, n) for n in (1, 4)}
            finally:
                server.shutdown()
                answers.close()
    finally:
        ledger.close()
    one = figures["no_memory"]["clients_1"]["tokens_per_s"]
    figures["throughput_ratio"] = round(one / figures["plain_generate"]["tokens_per_s"], 4)
    figures["memory_cost"] = round(1 - figures["memory_1000"]["clients_1"]["tokens_per_s"] / one, 4)
    figures["bars"] = {"throughput_ratio >= 0.85": figures["throughput_ratio"] >= 0.85,
                       "memory_cost <= 0.10": figures["memory_cost"] <= 0.10}
    out = Path(__file__).parent / "results" / "serving.json"
    out.write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
