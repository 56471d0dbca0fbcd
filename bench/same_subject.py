"""Several facts about one subject (issue #22): do both corrections of a pair hold in one routed memory?

The 50 hand-written pairs of tests/data/same_subject_pairs.jsonl (one subject, two relations:
"Lionel Messi plays for the club" -> Arsenal, "Lionel Messi is a citizen of" -> Japan) are edited
into one routed memory exactly as the service does (default profile, the shipped editor, its batch
size, compressed entries). Two entries about one subject have near-identical keys (the subject's
last token reads the same), so on its key alone the more similar one takes both prompts. Read
twice: with each entry's relation (the state at its prompt's last token) choosing among namesakes
(editors/memory_model.choose, the served rule), and with keys alone (relations dropped).

Per variant: both_hold (pairs whose two prompts both say their own target in a 20-token greedy
answer), gen_prompt and gen_rephrase (the target said), to_own_entry (prompts and rephrasings
routed to their own entry), teacher-forced reliability and generalization, and sample answers.
And other_question: with one side of each pair left out of the memory, that side's prompts and
rephrasings ask the kept entry's subject another question; leak is the share whose answer says the
kept entry's target (the base model's does not), changed the share whose first 4 words change.

With --beside HOME the pairs join the memory that home serves (the continual run's, at T = 10,000:
issue #22 asks the pairs to hold there), keyed against that home's reference, and the model is the
home's served model:

    python bench/same_subject.py [--out bench/results/same_subject.json]
    python bench/same_subject.py --beside bench/work/continual/mendd-routed --out bench/results/same_subject_T10000.json
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from daemon.config import load_config
from daemon.editor_jobs import edit_as_served
from daemon.home import Home
from daemon.provision import base_editable, provisioned
from daemon.runtime import Runtime
from editors.editable import Editable
from editors.formats import load_corrections
from editors.reading import first_words, mentions, newly_says
from editors.routing import Memory
from editors.serving import serving_entries
from policies.served_eval import Served
from report import report

MODEL = "smollm2-135m"
TOKENS = 20
PAIRS = Path(__file__).resolve().parents[1] / "tests" / "data" / "same_subject_pairs.jsonl"


def figures(editable: Editable, memory: Memory, edited) -> dict:
    served = Served(editable, memory=memory)
    owner = {e.correction_id: i for i, e in enumerate(memory.entries)}
    asked = [(c, c.prompt) for c in edited] + [(c, r) for c in edited for r in c.rephrases]
    said = served.say([q for _, q in asked], TOKENS)
    routes = serving_entries(editable, [q for _, q in asked], memory)
    hit = [mentions(text, c.target_new) for (c, _), text in zip(asked, said)]
    own = [route == owner[c.id] for (c, _), route in zip(asked, routes)]
    on_prompt = {c.id: h for (c, _), h in zip(asked[: len(edited)], hit)}
    pairs = {c.id[:-2] for c in edited if f"{c.id[:-2]}-a" in on_prompt and f"{c.id[:-2]}-b" in on_prompt}
    reliability, generalization = served.teacher_forced(edited)
    n = len(edited)
    return {"pairs": len(pairs),
            "both_hold": round(sum(on_prompt[f"{p}-a"] and on_prompt[f"{p}-b"] for p in pairs) / max(len(pairs), 1), 4),
            "gen_prompt": round(sum(hit[:n]) / n, 4), "gen_rephrase": round(sum(hit[n:]) / max(len(hit) - n, 1), 4),
            "to_own_entry": round(sum(own) / len(own), 4),
            "reliability": round(reliability, 4), "generalization": round(generalization, 4),
            "samples": [f"{q} -> {text}" for (_, q), text in list(zip(asked, said))[:6]]}


def other_question(editable: Editable, memory: Memory, edited) -> dict:
    """With one side of each pair left out of the memory, its prompts and rephrasings ask another
    question about a subject the memory holds a correction for: the share whose answer says the
    kept side's target where the base model's does not (the entry answered a question it was not
    about), the share whose first 4 words change at all, and sample answers."""
    by_id = {c.id: c for c in edited}
    asked, said, base = [], [], []  # (the kept correction, a question of its partner's)
    for side, other in (("a", "b"), ("b", "a")):
        kept = memory.without({c.id for c in edited if c.id.endswith(other)})
        rows = [(by_id[c.id[:-1] + side], q) for c in edited if c.id.endswith(other) and c.id[:-1] + side in by_id
                for q in (c.prompt, *c.rephrases)]
        asked += rows
        said += Served(editable, memory=kept).say([q for _, q in rows], TOKENS)
        base += Served(editable).say([q for _, q in rows], TOKENS)
    leak = [newly_says(s, b, k.target_new) for (k, _), s, b in zip(asked, said, base)]
    changed = [first_words(s, 4) != first_words(b, 4) for s, b in zip(said, base)]
    return {"asked": len(asked), "leak": round(sum(leak) / max(len(leak), 1), 4),
            "changed": round(sum(changed) / max(len(changed), 1), 4),
            "samples": [f"{q} -> {s} (base: {b}) [the memory holds: {k.prompt} {k.target_new}]"
                        for (k, q), s, b, hit in zip(asked, said, base, leak) if hit][:6]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "work" / "same_subject")
    parser.add_argument("--beside", type=Path, default=None,
                        help="a routed home whose served memory the pairs join (its model and reference too)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    records, _ = load_corrections(PAIRS)
    if args.beside:
        home = Home(args.beside)
        rt = Runtime.open(home, load_config(home))
        config, editable, stored = rt.config, rt.editable, rt.memory
        rt.close()
    else:
        home = Home(args.work / "home")
        config = provisioned(home, MODEL)
        editable, stored = base_editable(config), None
    before = len(stored.entries) if stored else 0
    print(f"editing {len(records)} corrections beside {before} entries...", file=sys.stderr)
    served, edited = edit_as_served(home, config, editable, records, config.batch_size)
    memory = stored.plus(list(served.memory.entries)) if stored else served.memory
    key_only = replace(memory, entries=tuple(replace(e, relation=None) for e in memory.entries))
    rows = {name: figures(editable, used, edited) for name, used in (("relations", memory), ("keys_alone", key_only))}
    rows["other_question"] = other_question(editable, memory, edited)
    summary = {"model": MODEL, "records": len(records), "edited": len(edited), "entries_before": before,
               "beside": str(args.beside) if args.beside else None, "variants": rows,
               "bar_both_hold": 0.9, "seconds": round(time.perf_counter() - started)}
    report(summary, args.out)


if __name__ == "__main__":
    main()
