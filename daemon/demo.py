"""`mendd demo`: the whole way through on a fresh temporary home with every embedded default.

SmolLM2-135M, the shipped MEND editor, the default policy, SQLite ledger, MLflow on SQLite and a
git+DVC store; the demo feed (daemon/demo_feed.jsonl) holds good corrections, a contradiction,
malformed records and harmful ones. Cycles run until nothing is pending; then a table shows each
correction's fate and the model's answers before and after.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from daemon.config import load_config
from daemon.cycle import CycleReport, run_cycle
from daemon.feeds import ingest, located
from daemon.home import Home
from daemon.provision import provision_home
from daemon.runtime import Runtime
from daemon.versioning import home_lock
from editors.serving import continuation

DEMO_FEED = Path(__file__).with_name("demo_feed.jsonl")
DEMO_MODEL = "smollm2-135m"
DEMO_BATCH = 2  # contradictions next to each other meet; larger batches of this editor are mostly bisected


@dataclass(frozen=True)
class DemoRow:
    correction_id: str
    prompt: str
    target: str
    status: str
    version: str | None
    before: str
    after: str
    reason: str


def run_demo(root: Path | None, say) -> tuple[Home, list[DemoRow], list[CycleReport]]:
    home = Home(root or Path(tempfile.mkdtemp(prefix="mendd-demo-")))
    say(f"home: {home.root}")
    say(f"loading {DEMO_MODEL}, committing it as v0000 and pinning the regression suites from it...")
    provision_home(home, DEMO_MODEL, settings={"batch_size": DEMO_BATCH})
    config = load_config(home)
    with home_lock(home):
        rt = Runtime.open(home, config)
        try:
            ledger = rt.records.versions.ledger
            with open(DEMO_FEED, "rb") as handle:
                report = ingest(ledger, home, "demo", located(DEMO_FEED.name, handle))
            say(f"demo feed: {report.received} corrections received, {report.quarantined} quarantined")
            prompts = {row.external_id: row.payload["prompt"] for row in ledger.corrections() if "prompt" in row.payload}
            before = answers(rt, prompts)
            cycles = []
            while ledger.pending(1):
                cycles.append(run_cycle(rt))
                say(f"cycle {cycles[-1].cycle_id}: {cycles[-1].outcome}; serving {cycles[-1].version}")
            after = answers(rt, prompts)
            rows = [DemoRow(row.external_id, row.payload.get("prompt", ""), row.payload.get("target_new", ""),
                            row.status.value, row.version, before.get(row.external_id, ""), after.get(row.external_id, ""),
                            row.reason or "") for row in ledger.corrections()]
        finally:
            rt.close()
    return home, rows, cycles


def answers(rt: Runtime, prompts: dict[str, str], tokens: int = 6) -> dict[str, str]:
    """Greedy continuations of each prompt by the served model."""
    found = {cid: continuation(rt.editable, prompt, tokens, rt.memory) for cid, prompt in prompts.items()}
    return {cid: text for cid, text in found.items() if text is not None}
