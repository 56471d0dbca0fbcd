"""Other questions about a corrected subject, in a public set's own words (issue #35).

`mendd eval --served` asks other questions made from our relation templates
(`policies/data/relations/relations.json`), which the relation reader was trained on (its tuning
half). This bench asks them in wording neither saw: MQuAKE-CF's (Zhong et al. 2023, vendored in
`policies/data/mquake`), whose cases carry a cloze form per Wikidata relation ("The name of the
current head of the {} government is", "{} was born in the city of").

One routed memory holds MQuAKE-CF's distinct rewrites (337: "Ellie Kemper is a citizen of -> Croatia")
and, to make it as large as the issue's bar asks (N >= 500), the measuring half of CounterFact val.
For each MQuAKE rewrite, its other questions are MQuAKE's cloze forms of up to 2 other relations
that ask about the same kind of subject (`policies/relations.py` kinds; never one that asks the same
question, nor one the memory also corrects about that subject), filled with its subject. Figures:
`other_leak` (the answer newly says the rewrite's target), `other_changed` (its first four words
change), and `gen_prompt` (the rewrite's own prompt says its target), with and without the subject
field. Nothing here chose a design or a threshold.

    python bench/public_same_subject.py [--fill 500] [--work bench/work/served] [--out bench/results/public_same_subject.json]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

from daemon.editor_jobs import edit_as_served
from daemon.home import Home
from daemon.provision import base_editable, provisioned
from editors.formats import load_corrections
from editors.reading import mentions
from editors.types import Correction
from policies.probes import data_dir
from policies.relations import OtherQuestion, Relations, half, load_relations, normalized
from policies.served_eval import Served, other_question_figures, without_subject
from report import report

MODEL = "smollm2-135m"
PER_CORRECTION = 2
SEED = 35


def cloze_forms(cases: list[dict]) -> dict[str, set[str]]:
    """Each Wikidata relation's cloze forms in MQuAKE's words, the subject taken out ("{}")."""
    forms: dict[str, set[str]] = {}
    for case in cases:
        orig = case["orig"]
        for hops, triples, labelled in ((case["single_hops"], orig["triples"], orig["triples_labeled"]),
                                        (case["new_single_hops"], orig["new_triples"], orig["new_triples_labeled"])):
            for hop, (_, relation, _), (subject, _, _) in zip(hops, triples, labelled):
                if subject in hop["cloze"]:
                    forms.setdefault(relation, set()).add(hop["cloze"].replace(subject, "{}"))
    return forms


def rewrites(cases: list[dict]) -> list[tuple[Correction, str]]:
    """MQuAKE's distinct rewrites (one per subject and prompt) with their relation ids."""
    relation = {f"mquake-{case['case_id']}-{i}": r["relation_id"] for case in cases
                for i, r in enumerate(case["requested_rewrite"])}
    records, _ = load_corrections(data_dir() / "mquake" / "MQuAKE-CF.json")
    seen: set[tuple[str, str]] = set()
    out = []
    for c in records:
        if (c.subject, c.prompt) not in seen:
            seen.add((c.subject, c.prompt))
            out.append((c, relation[c.id]))
    return out


def questions(edits: list[tuple[Correction, str]], forms: dict[str, set[str]], relations: Relations) -> list[OtherQuestion]:
    """Up to PER_CORRECTION other questions per rewrite, in MQuAKE's cloze forms."""
    held: dict[str, set[str]] = {}
    for c, r in edits:
        held.setdefault(normalized(c.subject or ""), set()).add(r)
    out = []
    for c, r in edits:
        if r not in relations.by_id:
            continue
        kind = relations.by_id[r].kinds[0]
        skip = frozenset().union(*(relations.asking_as(h) for h in held[normalized(c.subject or "")]))
        asked = sorted(o for o in forms if o in relations.by_id and kind in relations.by_id[o].kinds and o not in skip)
        rng = random.Random(f"{SEED}:{c.id}")
        for other in rng.sample(asked, min(PER_CORRECTION, len(asked))):
            out.append(OtherQuestion(c.id, other, rng.choice(sorted(forms[other])).replace("{}", c.subject or "")))
    return out


def measured(home: Home, config, editable, records: list[Correction], public: list[Correction],
             asked: list[OtherQuestion], console: Console) -> dict:
    started = time.perf_counter()
    served, edited = edit_as_served(home, config, editable, records)
    carried = [c for c in public if c.id in {e.id for e in edited}]
    leak, changed, rows = other_question_figures(served, Served(editable), carried, asked)
    said = served.say([c.prompt for c in carried])
    console.print(f"{len(edited)} edited, {len(carried)} MQuAKE: other_leak {leak}, other_changed {changed}")
    return {"entries": len(edited), "public_edited": len(carried), "questions": len(rows),
            "other_leak": _round(leak), "other_changed": _round(changed),
            "gen_prompt": _round(sum(mentions(s, c.target_new) for s, c in zip(said, carried)) / max(len(carried), 1)),
            "seconds": round(time.perf_counter() - started),
            "samples": sorted(rows, key=lambda r: (not r["leak"], not r["changed"]))[:12]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fill", type=int, default=500, help="entries in the memory in all (CounterFact's measuring half fills it)")
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "work" / "served", help="shares bench/served_answers.py's home")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(file=sys.stderr)
    home = Home(args.work / "home")
    config = provisioned(home, MODEL)
    editable = base_editable(config)
    cases = json.loads((data_dir() / "mquake" / "MQuAKE-CF.json").read_text())
    edits = rewrites(cases)
    public = [c for c, _ in edits]
    asked = questions(edits, cloze_forms(cases), load_relations(data_dir()))
    val, _ = load_corrections(data_dir() / "counterfact" / "val.json")
    filler = [c for c in val if c.subject and half(c.subject) == "measuring"][: max(args.fill - len(public), 0)]
    records = public + filler
    summary = {"model": MODEL, "set": "MQuAKE-CF rewrites, asked in MQuAKE's cloze forms", "rewrites": len(public),
               "filler": f"{len(filler)} CounterFact val records of the measuring half",
               "runs": {"subject": measured(home, config, editable, records, public, asked, console),
                        "no_subject": measured(home, config, editable, without_subject(records),
                                               without_subject(public), asked, console)}}
    report(summary, args.out)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


if __name__ == "__main__":
    sys.exit(main())
