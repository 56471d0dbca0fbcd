"""`mendd demo`: the whole way through on a fresh temporary home with every embedded default.

SmolLM2-135M, the shipped MEND editor, the default policy, SQLite ledger, MLflow on SQLite and a
git+DVC store; the demo feed (daemon/demo_feed.jsonl) holds good corrections, a contradiction,
malformed records and harmful ones; most records name their subject, two leave routing to guess it.
Cycles run until nothing is pending; then a table shows each correction's fate and the model's
answers before and after, and a second the answers to neighbouring prompts no correction is about
and to other questions about corrected subjects.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from daemon.config import load_config
from daemon.cycle import CycleReport, run_cycle
from daemon.feeds import ingest, located
from daemon.home import Home
from daemon.home_lock import home_lock
from daemon.provision import provision_home
from daemon.runtime import Runtime
from editors.serving import continuations

DEMO_FEED = Path(__file__).with_name("demo_feed.jsonl")
DEMO_MODEL = "smollm2-135m"
DEMO_BATCH = 2  # contradictions next to each other meet; larger batches of this editor are mostly bisected
ANSWER_TOKENS = 12
# Prompts next to the demo's corrections that no correction is about: their answers must not change.
NEIGHBOURS = {
    "The currency of China is the": "demo-09 (Japan's currency)",
    "The Nile River flows through": "demo-10 (the Amazon)",
    "The capital of Italy is": "demo-01/02 (France's capital)",
    "Mount Everest is located in": "demo-11 (Kilimanjaro)",
    "Cristiano Ronaldo plays the sport of": "demo-08 (Messi)",
}
# Other questions about corrected subjects: a correction answers its own question only (issue #35).
OTHER_QUESTIONS = {
    "Lionel Messi was born in": "demo-08 (Messi's sport)",
    "The official language of France is": "demo-02 (France's capital)",
    "William Shakespeare was born in": "demo-13 (Shakespeare's language)",
    "Toyota was founded by": "demo-06 (Toyota's headquarters)",
}


@dataclass(frozen=True)
class NeighbourRow:
    prompt: str
    next_to: str
    before: str
    after: str
    other_question: bool = False  # about a corrected subject, not next to it

    @property
    def unchanged(self) -> bool:
        return self.before == self.after


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


def run_demo(root: Path | None, say) -> tuple[Home, list[DemoRow], list[CycleReport], list[NeighbourRow]]:
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
            asked = {**NEIGHBOURS, **OTHER_QUESTIONS}
            near_before = answers(rt, dict(zip(asked, asked)))
            cycles = []
            while ledger.pending(1):
                cycles.append(run_cycle(rt))
                say(f"cycle {cycles[-1].cycle_id}: {cycles[-1].outcome}; serving {cycles[-1].version}")
            after = answers(rt, prompts)
            near_after = answers(rt, dict(zip(asked, asked)))
            neighbours = [NeighbourRow(p, n, near_before[p], near_after[p], p in OTHER_QUESTIONS) for p, n in asked.items()]
            rows = [DemoRow(row.external_id, row.payload.get("prompt", ""), row.payload.get("target_new", ""),
                            row.status.value, row.version, before.get(row.external_id, ""), after.get(row.external_id, ""),
                            row.reason or "") for row in ledger.corrections()]
        finally:
            rt.close()
    return home, rows, cycles, neighbours


def answers(rt: Runtime, prompts: dict[str, str], tokens: int = ANSWER_TOKENS) -> dict[str, str]:
    """Greedy continuations of each (non-empty) prompt by the served model."""
    keep = {key: prompt for key, prompt in prompts.items() if rt.editable.tokenizer(prompt).input_ids}
    return dict(zip(keep, continuations(rt.editable, list(keep.values()), tokens, rt.memory))) if keep else {}
