"""Does a real `mendd run` stay flat in memory and free of errors for an hour (issue #34's soak)? Prints JSON.

A fresh home on the default model (`mendd init`: SmolLM2-135M, shipped editor, routed memory,
batches of 10), a file feed, an HTTP port and a bearer token; then `mendd run` as a subprocess
(its log in the work folder), spoken to only on 127.0.0.1, for --minutes:

- one client (the `openai` package) streams greedy answers of --tokens back to back, completions and
  chat in turn, cycling over the prompts, rephrasings and neighbourhood prompts of every correction
  sent so far;
- every --every minutes a round of corrections: --feed-records CounterFact records appended to the
  feed file and one POSTed to /v1/corrections (the service edits, gates and commits them meanwhile);
- /healthz is asked every 10 s; the service's resident memory (its process and any children, such as
  git and DVC during a commit) is sampled every 30 s.

Records: CounterFact val[:1000], the slice `bench/continual.py` streams: the shipped editor was
trained on train and its step, τ and routing layer were chosen on val[1000:1919], so these are held
out from both.

Figures: the RSS samples [t_s, rss_bytes, children_rss_bytes]; rss at --warm-minutes (10) and at the
end; growth_after_warm_up, end / at-warm-up - 1 and max over [warm-up, end] / at-warm-up - 1 (the bar:
<= 0.05); errors (client exceptions, non-200 /healthz answers, 5xx or otherwise refused POSTs, ERROR
and Traceback lines in the service log), counted with the first few; answers, tokens streamed and
their latency per 10-minute window; corrections sent and what the ledger made of them (`mendd status
--json`); the versions reached; and the service's exit code after SIGTERM (0 expected). With --out,
the JSON is written there and a PNG of RSS over time beside it.

    python bench/soak.py [--minutes 60] [--every 2] [--feed-records 3] [--tokens 32] [--work DIR] [--out FILE]
    nohup .venv/bin/python bench/soak.py --minutes 60 --out bench/results/soak_60min.json > bench/work/soak.log 2>&1 &
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import openai  # noqa: E402
import psutil  # noqa: E402

from daemon.home import Home  # noqa: E402
from policies.probes import data_dir  # noqa: E402
from report import report  # noqa: E402
from serving import percentile  # noqa: E402
from service_harness import MENDD, configure, free_port, get_json, start_service, wait_for  # noqa: E402
from sharing import listening  # noqa: E402

MODEL = "smollm2-135m"
HEALTH_EVERY_S = 10.0
SAMPLE_EVERY_S = 30.0
WINDOW_S = 600.0  # answers are summarised per 10-minute window, to see a slowdown as well as growth
KEEP_MESSAGES = 10
ERROR_LINE = re.compile(r" (ERROR|CRITICAL) |Traceback \(most recent call last\)")
WARNING_LINE = re.compile(r" WARNING ")


class Errors:
    """Every error seen, by source; the first few kept with their time."""

    def __init__(self, started: float):
        self.started, self.lock = started, threading.Lock()
        self.by_source: dict[str, int] = {}
        self.first: list[str] = []

    def add(self, source: str, message: str) -> None:
        with self.lock:
            self.by_source[source] = self.by_source.get(source, 0) + 1
            if len(self.first) < KEEP_MESSAGES:
                self.first.append(f"{time.monotonic() - self.started:.0f} s {source}: {message}"[:500])
            print(f"error ({source}): {message}"[:500], file=sys.stderr, flush=True)

    def figures(self) -> dict:
        return {"count": sum(self.by_source.values()), "by_source": self.by_source, "first": self.first}


class Client:
    """One client streaming answers back to back until stopped, over the prompts of what was sent."""

    def __init__(self, client: openai.OpenAI, tokens: int, errors: Errors, started: float):
        self.client, self.tokens, self.errors, self.started = client, tokens, errors, started
        self.prompts: list[str] = []
        self.answers: list[tuple[float, float, float, int]] = []  # (start, first token, end, tokens), monotonic
        self.versions: set[str] = set()  # system_fingerprint: the version that answered
        self.lock, self.stopping = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._run, name="soak-client", daemon=True)

    def add(self, prompts: list[str]) -> None:
        with self.lock:
            self.prompts += prompts

    def _run(self) -> None:
        i = 0
        while not self.stopping.is_set():
            with self.lock:
                prompt = self.prompts[i % len(self.prompts)]
            try:
                self._ask(prompt, chat=i % 2 == 1)
            except openai.APIStatusError as error:
                self.errors.add("client-5xx" if error.status_code >= 500 else "client",
                                f"HTTP {error.status_code}: {error.message}")
                self.stopping.wait(1.0)
            except Exception as error:  # noqa: BLE001 - any failure of an answer is an error to count
                self.errors.add("client", f"{type(error).__name__}: {error}")
                self.stopping.wait(1.0)  # a dead server must not turn into a tight loop of errors
            i += 1

    def _ask(self, prompt: str, chat: bool) -> None:
        common = dict(model=MODEL, max_tokens=self.tokens, temperature=0, stream=True,
                      stream_options={"include_usage": True})
        start, first, count, version = time.monotonic(), None, 0, None
        stream = (self.client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **common) if chat
                  else self.client.completions.create(prompt=prompt, **common))
        for chunk in stream:
            piece = (chunk.choices[0].delta.content if chat else chunk.choices[0].text) if chunk.choices else None
            if first is None and piece:
                first = time.monotonic()
            if chunk.usage is not None:
                count = chunk.usage.completion_tokens
            version = chunk.system_fingerprint or version
        end = time.monotonic()
        if count == 0:
            raise RuntimeError(f"an answer of no tokens to {prompt!r}")
        with self.lock:
            self.answers.append((start, first or end, end, count))
            if version:
                self.versions.add(version)

    def figures(self, end: float) -> dict:
        with self.lock:
            answers = list(self.answers)
        windows = []
        for low in range(0, max(1, int((end - self.started) // WINDOW_S + 1))):
            lo, hi = self.started + low * WINDOW_S, min(end, self.started + (low + 1) * WINDOW_S)
            inside = [a for a in answers if lo <= a[0] < hi]
            if hi > lo and inside:
                windows.append({"from_min": round((lo - self.started) / 60, 1), "to_min": round((hi - self.started) / 60, 1),
                                "answers": len(inside), "tokens_per_s": round(sum(a[3] for a in inside) / (hi - lo), 2),
                                "latency_p50_s": round(statistics.median(a[2] - a[0] for a in inside), 3),
                                "latency_p99_s": round(percentile([a[2] - a[0] for a in inside], 0.99), 3)})
        ttft = [a[1] - a[0] for a in answers]
        return {"answers": len(answers), "tokens": sum(a[3] for a in answers),
                "ttft_p50_s": round(statistics.median(ttft), 3) if ttft else None,
                "ttft_p99_s": round(percentile(ttft, 0.99), 3) if ttft else None,
                "versions_seen": sorted(self.versions), "windows": windows}


def resident(pid: int) -> tuple[int, int]:
    """The service's resident bytes and those of its children (git, DVC: short-lived) now."""
    process = psutil.Process(pid)
    own, children = process.memory_info().rss, 0
    for child in process.children(recursive=True):
        try:
            children += child.memory_info().rss
        except psutil.NoSuchProcess:  # a git that ended between the listing and the reading
            pass
    return own + children, children


def post(api: str, token: str, record: dict) -> tuple[int, str]:
    request = urllib.request.Request(f"{api}/v1/corrections", data=json.dumps(record).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=90) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def mendd_json(home: Home, *command: str) -> dict:
    done = subprocess.run([MENDD, "--home", str(home.root), *command, "--json"], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"mendd {' '.join(command)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def growth(samples: list[list[float]], warm_s: float, column: int) -> dict:
    """RSS at the first sample from `warm_s` on, at the end, and growth after it (end and max)."""
    after = [s for s in samples if s[0] >= warm_s]
    base = after[0][column]
    return {"at_warm_up_bytes": base, "at_end_bytes": after[-1][column],
            "end": round(after[-1][column] / base - 1, 4), "max": round(max(s[column] for s in after) / base - 1, 4)}


def plot(samples: list[list[float]], rounds: list[float], warm_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s[0] / 60 for s in samples]
    figure, axes = plt.subplots(figsize=(9, 4.5))
    axes.plot(minutes, [s[1] / 2**20 for s in samples], label="service + children")
    axes.plot(minutes, [(s[1] - s[2]) / 2**20 for s in samples], label="service alone", linestyle="--")
    base = next((s[1] for s in samples if s[0] >= warm_s), None)
    if base is not None:
        axes.axhline(base * 1.05 / 2**20, color="red", linewidth=0.8, label="+5% over the warm-up sample")
    axes.axvline(warm_s / 60, color="grey", linewidth=0.8, label="end of warm-up")
    for t in rounds:
        axes.axvline(t / 60, color="green", alpha=0.35, linewidth=0.8)
    axes.set_xlabel("minutes since the service was ready (green: correction rounds)")
    axes.set_ylabel("resident memory (MiB)")
    axes.set_title("mendd run soak: resident memory")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--warm-minutes", type=float, default=10.0, help="growth is measured from this sample on")
    parser.add_argument("--every", type=float, default=2.0, help="minutes between correction rounds")
    parser.add_argument("--feed-records", type=int, default=3, help="records appended to the feed each round")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--work", type=Path, default=None, help="default bench/work/soak-<minutes>min")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.warm_minutes >= args.minutes:
        raise SystemExit("--warm-minutes must be shorter than --minutes")
    work = args.work or Path(__file__).parent / "work" / f"soak-{args.minutes:g}min"
    if work.exists():
        raise SystemExit(f"{work} exists: the soak needs a fresh home (remove it)")
    # Traffic goes to 127.0.0.1 only: no proxy from the environment may carry it elsewhere.
    for name in [n for n in os.environ if n.lower() in ("http_proxy", "https_proxy", "all_proxy")]:
        del os.environ[name]
    records = json.loads((data_dir() / "counterfact" / "val.json").read_text())[:1000]

    home, log_path, feed = Home(work / "home"), work / "service.log", work / "feed.jsonl"
    work.mkdir(parents=True)
    print(f"mendd init {home.root}...", file=sys.stderr, flush=True)
    subprocess.run([MENDD, "--home", str(home.root), "init"], check=True, capture_output=True)
    feed.write_text("")
    port, token = free_port(), secrets.token_urlsafe(24)
    # The shipped defaults but for the port and the feed: configure's 1 s check is a test's setting.
    configure(home, port, [{"name": "soak", "kind": "file", "path": str(feed.resolve())}],
              **{"check_interval_s: 1.0": "check_interval_s: 10.0"})
    api = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=f"{api}/v1", api_key=token, max_retries=0, timeout=300)
    process = start_service(home, log_path, env={"MENDD_HTTP__TOKEN": token})
    print(f"mendd run (pid {process.pid}) on {api}, log {log_path}", file=sys.stderr, flush=True)
    exit_code, stop_s, summary = None, None, {}
    try:
        wait_for(lambda: listening(client), 900, "the endpoint", process)
        started = time.monotonic()
        errors = Errors(started)
        answers = Client(client, args.tokens, errors, started)
        samples: list[list[float]] = []
        rounds: list[float] = []
        sent = {"feed": 0, "post": 0}
        next_record = 0

        def correction_round() -> None:
            nonlocal next_record
            batch = records[next_record : next_record + args.feed_records + 1]
            next_record += len(batch)
            with open(feed, "a", encoding="utf-8") as handle:  # one write of whole lines: never a half line
                handle.write("".join(json.dumps(r) + "\n" for r in batch[:-1]))
            sent["feed"] += len(batch) - 1
            code, body = post(api, token, batch[-1])
            sent["post"] += 1
            if code != 202:
                errors.add("post-5xx" if code >= 500 else "post", f"HTTP {code}: {body[:300]}")
            answers.add([p for r in batch for p in (r["prompt"], r["rephrase_prompt"], r["locality_prompt"])])
            rounds.append(time.monotonic() - started)

        correction_round()  # the client needs prompts before it starts
        answers.thread.start()
        end = started + args.minutes * 60
        due = {"health": started, "sample": started, "round": started + args.every * 60}
        while (now := time.monotonic()) < end:
            if process.poll() is not None:
                errors.add("service", f"mendd run exited by itself with code {process.returncode}")
                break
            if now >= due["sample"]:
                total, children = resident(process.pid)
                samples.append([round(now - started, 1), total, children])
                print(f"{(now - started) / 60:5.1f} min  rss {total / 2**20:7.1f} MiB (children {children / 2**20:.1f})"
                      f"  answers {len(answers.answers)}  errors {errors.figures()['count']}", file=sys.stderr, flush=True)
                due["sample"] += SAMPLE_EVERY_S
            if now >= due["health"]:
                try:
                    code, body = get_json(f"{api}/healthz")
                    if code != 200:  # once ready, nothing here should degrade it: each answer other than 200 counts
                        errors.add("healthz", f"HTTP {code}: {body.get('problems')}")
                except Exception as error:  # noqa: BLE001 - a healthz that cannot be read is an error too
                    errors.add("healthz", f"{type(error).__name__}: {error}")
                due["health"] += HEALTH_EVERY_S
            if now >= due["round"]:
                correction_round()
                due["round"] += args.every * 60
            time.sleep(max(0.0, min(min(due.values()), end) - time.monotonic()))
        if process.poll() is None:  # the last sample, at the end
            total, children = resident(process.pid)
            samples.append([round(time.monotonic() - started, 1), total, children])
        answers.stopping.set()
        answers.thread.join(timeout=600)
        finished = time.monotonic()
        summary = {"model": MODEL, "minutes": args.minutes, "warm_minutes": args.warm_minutes, "every_minutes": args.every,
                   "tokens": args.tokens, "sample_fields": ["t_s", "rss_bytes", "children_rss_bytes"], "samples": samples,
                   "growth_after_warm_up": growth(samples, args.warm_minutes * 60, 1),
                   "growth_after_warm_up_service_alone": growth([[s[0], s[1] - s[2]] for s in samples],
                                                                args.warm_minutes * 60, 1),
                   "answering": answers.figures(finished),
                   "corrections_sent": {**sent, "rounds": len(rounds)}}
    finally:
        if process.poll() is None:
            print("SIGTERM to mendd run...", file=sys.stderr, flush=True)
            stopping = time.monotonic()
            process.send_signal(signal.SIGTERM)
            try:  # the running job finishes first: a cycle stops between decisions
                exit_code = process.wait(timeout=900)
            except subprocess.TimeoutExpired:
                process.kill()
                exit_code = f"killed: no exit 900 s after SIGTERM (then {process.wait()})"
            stop_s = round(time.monotonic() - stopping, 1)
        else:
            exit_code = process.returncode
    if not summary:
        raise SystemExit(f"the soak stopped early; see {log_path}")
    if exit_code != 0:
        errors.add("service", f"exit code {exit_code} after SIGTERM")
    log_lines = log_path.read_text(errors="replace").splitlines()
    for line in [line for line in log_lines if ERROR_LINE.search(line)]:
        errors.add("log", line)
    warnings = [line for line in log_lines if WARNING_LINE.search(line)]
    status, versions = mendd_json(home, "status"), mendd_json(home, "versions")
    summary.update({
        "corrections": status["corrections"],
        "versions": {"head": versions["head"], "count": len(versions["versions"]),
                     "kinds": sorted({v["kind"] for v in versions["versions"]})},
        "exit_code": exit_code, "stop_seconds": stop_s,
        "errors": errors.figures(),
        "log_warnings": {"count": len(warnings), "first": warnings[:KEEP_MESSAGES]},
        "service_log": str(log_path)})
    g = summary["growth_after_warm_up"]
    summary["bars"] = {f"rss growth after {args.warm_minutes:g} min (max) <= 0.05": g["max"] <= 0.05,
                       "errors == 0": summary["errors"]["count"] == 0, "exit code 0": exit_code == 0}
    if args.out:
        plot(summary["samples"], rounds, args.warm_minutes * 60, args.out.with_suffix(".png"))
    report(summary, args.out)


if __name__ == "__main__":
    main()
