"""Do answers and the maintenance cycle hold each other up inside one `mendd run` (issue #21)? Prints JSON.

A real `mendd run` on a home with the default profile (SmolLM2-135M, shipped editor, routed memory),
spoken to over HTTP only, in three phases of one run:

- answers alone: `--clients` clients stream greedy completions of CounterFact prompts
  (`--tokens` each) for `--seconds`;
- cycle alone: a batch of `--batch` CounterFact val corrections posted to `/v1/corrections`; the
  cycle's own duration is read from the ledger (started_at to finished_at);
- both: on a second fresh home, the same batch posted while the same clients stream (the cycle does
  the same work); tokens per second and time to first token are counted over the cycle's own span,
  and the cycle's duration read as before.

Figures: `answers_kept` (tokens/s during a cycle ÷ alone), `cycle_slowdown` (cycle seconds with
answers ÷ alone), time to first token p50/p99 alone and during the cycle. Both parts run in one
process and share its torch threads (daemon/answering.py), so on 2 cores each is expected to get
about half of them while both work.

    python bench/sharing.py [--work bench/work/sharing] [--batch 20] [--clients 1] [--seconds 60]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import openai  # noqa: E402

from daemon.home import Home  # noqa: E402
from daemon.provision import provision_home  # noqa: E402
from editors.formats import load_corrections  # noqa: E402
from policies.probes import data_dir  # noqa: E402
from service_harness import configure, free_port, start_service, wait_for  # noqa: E402
from store.ledger import Ledger  # noqa: E402
from report import report

MODEL = "smollm2-135m"


class Clients:
    """Threads that stream completions one after another until stopped; each answer is kept with
    its start, its first token's time and its end (monotonic seconds), to be counted over a span."""

    def __init__(self, client: openai.OpenAI, prompts: list[str], tokens: int, count: int):
        self.client, self.prompts, self.tokens = client, prompts, tokens
        self.answers: list[tuple[float, float, float, int]] = []  # (start, first token, end, tokens)
        self.lock, self.stopping = threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self._ask, args=(i,), daemon=True) for i in range(count)]

    def __enter__(self) -> "Clients":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join()

    def _ask(self, offset: int) -> None:
        i = offset
        while not self.stopping.is_set():
            started, first, count = time.monotonic(), None, 0
            for chunk in self.client.completions.create(model=MODEL, prompt=self.prompts[i % len(self.prompts)],
                                                        max_tokens=self.tokens, temperature=0, stream=True,
                                                        stream_options={"include_usage": True}):
                if first is None and chunk.choices and chunk.choices[0].text:
                    first = time.monotonic()
                if chunk.usage is not None:
                    count = chunk.usage.completion_tokens
            end = time.monotonic()
            with self.lock:
                self.answers.append((started, first or end, end, count))
            i += len(self.threads)

    def figures(self, start: float, end: float) -> dict:
        """Over [start, end]: tokens/s of the answers that ended inside it (tokens spread evenly over
        each answer's span, so an answer straddling an edge counts its inside share), and the time to
        first token of the answers that began inside it."""
        with self.lock:
            answers = list(self.answers)
        produced = sum(n * max(0.0, min(e, end) - max(s, start)) / max(e - s, 1e-9) for s, _, e, n in answers)
        ttft = sorted(f - s for s, f, _, _ in answers if start <= s <= end)
        return {"seconds": round(end - start, 1), "tokens_per_s": round(produced / (end - start), 2),
                "answers_begun": len(ttft),
                "ttft_p50_s": round(statistics.median(ttft), 3) if ttft else None,
                "ttft_p99_s": round(ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))], 3) if ttft else None}


def listening(client: openai.OpenAI) -> bool:
    try:
        return bool(client.models.list().data)
    except openai.APIConnectionError:
        return False


def post_corrections(api: str, records: list[dict]) -> None:
    request = urllib.request.Request(f"{api}/v1/corrections", data=json.dumps(records).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 202, response.status


def next_cycle(home: Home, seen: int, process: subprocess.Popen) -> tuple[float, float, str]:
    """The first cycle after the `seen` ones, once finished: its start and end (epoch seconds) and outcome."""
    def finished():
        ledger = Ledger(home.ledger_url)
        try:
            cycles = ledger.cycles()
        finally:
            ledger.close()
        done = [c for c in cycles[seen:] if c.finished_at is not None]
        return done[0] if done else None

    cycle = wait_for(finished, 3600, "a cycle", process)
    return cycle.started_at.timestamp(), cycle.finished_at.timestamp(), cycle.outcome


def started(root: Path, port: int) -> tuple[Home, subprocess.Popen, openai.OpenAI, str]:
    """A fresh home (default profile) with `mendd run` on it, answering."""
    home = Home(root / "home")
    provision_home(home, MODEL)
    configure(home, port, [])
    api = f"http://127.0.0.1:{port}"
    process = start_service(home, root / "service.log")
    client = openai.OpenAI(base_url=f"{api}/v1", api_key="-", max_retries=0, timeout=600)
    wait_for(lambda: listening(client), 600, "the endpoint", process)
    return home, process, client, api


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "work" / "sharing")
    parser.add_argument("--batch", type=int, default=20, help="corrections in the cycle")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0, help="answers alone")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.work.exists():
        raise SystemExit(f"{args.work} exists: the run needs fresh homes (remove it)")
    records, _ = load_corrections(data_dir() / "counterfact" / "val.json", limit=args.batch + 50)
    batch = [{"id": c.id, "prompt": c.prompt, "subject": c.subject, "target_new": c.target_new,
              "rephrases": list(c.rephrases)} for c in records[: args.batch]]
    prompts = [c.prompt for c in records[args.batch :]]
    figures: dict = {}
    # The same batch on the same base version in two fresh homes: the cycle does the same work twice,
    # once alone and once while the clients stream.
    for phase in ("alone", "with_answers"):
        home, process, client, api = started(args.work / phase, free_port())
        try:
            client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=4, temperature=0)  # warm-up
            if phase == "alone":
                print("answers alone...", file=sys.stderr)
                with Clients(client, prompts, args.tokens, args.clients) as clients:
                    start = time.monotonic()
                    time.sleep(args.seconds)
                    figures["answers_alone"] = clients.figures(start, time.monotonic())
                print("cycle alone...", file=sys.stderr)
                post_corrections(api, batch)
                c_start, c_end, outcome = next_cycle(home, 0, process)
            else:
                print("cycle with answers...", file=sys.stderr)
                with Clients(client, prompts, args.tokens, args.clients) as clients:
                    offset = time.time() - time.monotonic()  # the ledger's epoch times onto the clients' clock
                    post_corrections(api, batch)
                    c_start, c_end, outcome = next_cycle(home, 0, process)
                    figures["answers_during_cycle"] = clients.figures(c_start - offset, c_end - offset)
            figures[f"cycle_{phase}"] = {"seconds": round(c_end - c_start, 1), "outcome": outcome}
        finally:
            process.terminate()
            process.wait(timeout=120)
    summary = {"model": MODEL, "batch": args.batch, "clients": args.clients, "tokens": args.tokens, **figures,
               "answers_kept": round(figures["answers_during_cycle"]["tokens_per_s"]
                                     / figures["answers_alone"]["tokens_per_s"], 3),
               "cycle_slowdown": round(figures["cycle_with_answers"]["seconds"] / figures["cycle_alone"]["seconds"], 3)}
    report(summary, args.out)


if __name__ == "__main__":
    main()
