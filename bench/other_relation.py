"""Does an entry answer other questions about its subject? (issue #22, the same-subject leak)

An entry serves a query that names its subject and whose states match its key; the key is read at
the subject's last token, so "William Shakespeare was born in" matches the entry of "The language
of William Shakespeare is" as well as that entry's own prompt, and the served model then says the
language correction's answer to the birthplace question. This bench measures how often that happens
and what a relation check costs: an entry serves only a query whose last state (what it asks) is
within `relation_tau` (cosine, centred) of the entry's relation (its prompt's last state).

No editing: entries are built as the service builds them (editors/routing.py, against the home's
pinned reference) with an empty update, and queries are routed as the service routes them
(editors/memory_model.route_queries: keys, leads, named subject, relations among namesakes). Sets:
- known: ROME's known facts (policies/data/known, 1,209 facts with Wikidata relation ids and
  templates), one entry each. Queries: its prompt (own); the same subject in another template of the
  same relation (paraphrase: own); the same subject asked another relation of its kind of subject
  (other, made by policies/relations.other_questions: a person's birthplace for a citizenship fact;
  any route is false unless the memory holds that fact about the subject);
- pairs: tests/data/same_subject_pairs.jsonl (50 subjects, two relations each, with rephrasings),
  one side's entries alone: the other side's prompts and rephrasings must not route (other); both
  sides' entries: each prompt and rephrasing to its own (both);
- counterfact: CounterFact val[0:--n] entries, their prompts and rephrasings (own: what
  generalization needs) and neighbourhood prompts (other subjects, false).

Per relation_tau (none: the served rule before this check): own and paraphrase routed to their
entry, other routed anywhere, and the distribution of the relation cosine for both kinds.

With --layers, the same cosine read at other blocks (the prompt's last state entering each, centred
by the mean of the known facts' own prompts there): whether a deeper state tells the question asked
apart better than the routing layer's does (a deeper block is past the edited ones: reading it would
take a pass of the base model before routing).

    python bench/other_relation.py [--n 500] [--taus 0.2 0.3 0.4] [--layers 8 14 20 26 29] [--out F]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from daemon.home import Home
from daemon.provision import provisioned
from daemon.runtime import Runtime
from editors.formats import load_corrections
from editors.memory_model import NONE, query_ends, route_queries, unit
from editors.routing import Memory, Reference, entries, prompt_states
from editors.types import Correction
from policies.probes import data_dir
from policies.relations import Relations, load_relations, other_questions, relation_of
from report import report

MODEL = "smollm2-135m"
PAIRS = Path(__file__).resolve().parents[1] / "tests" / "data" / "same_subject_pairs.jsonl"


@dataclass(frozen=True)
class Query:
    text: str
    owner: int  # the entry that should serve it; NONE: none should


def known_set(rng: random.Random, relations: Relations) -> tuple[list[Correction], dict[str, list[Query]]]:
    facts = json.loads((data_dir() / "known" / "known_1000.json").read_text())
    templates: dict[str, list[str]] = {}
    for f in facts:
        templates.setdefault(f["relation_id"], [])
        if f["template"] not in templates[f["relation_id"]]:
            templates[f["relation_id"]].append(f["template"])
    records = [Correction(f"known-{f['known_id']}", f["prompt"], f["attribute"], subject=f["subject"]) for f in facts]
    held = {(c.subject, relation.id): i for i, c in enumerate(records) if (relation := relation_of(c, relations))}
    queries: dict[str, list[Query]] = {"own": [], "paraphrase": [], "other": []}
    for i, (f, record) in enumerate(zip(facts, records)):
        queries["own"].append(Query(f["prompt"], i))
        others = [t.format(f["subject"]) for t in templates[f["relation_id"]] if t != f["template"]]
        if others:
            queries["paraphrase"].append(Query(rng.choice(others), i))
        for q in other_questions(record, relations, 1, rng):
            owner = next((held[(record.subject, r)] for r in relations.asking_as(q.relation_id)
                          if (record.subject, r) in held), NONE)
            queries["other"].append(Query(q.text, owner))
    return records, queries


def pair_sets() -> dict[str, tuple[list[Correction], dict[str, list[Query]]]]:
    records, _ = load_corrections(PAIRS)
    sides = {"a": [c for c in records if c.id.endswith("-a")], "b": [c for c in records if c.id.endswith("-b")]}

    def asked(side: list[Correction], owned: bool) -> list[Query]:
        return [Query(text, i if owned else NONE) for i, c in enumerate(side) for text in (c.prompt, *c.rephrases)]

    both = sides["a"] + sides["b"]
    return {
        "pairs_a_alone": (sides["a"], {"own": asked(sides["a"], True), "other": asked(sides["b"], False)}),
        "pairs_b_alone": (sides["b"], {"own": asked(sides["b"], True), "other": asked(sides["a"], False)}),
        "pairs_both": (both, {"both": asked(both, True)}),
    }


def counterfact_set(n: int) -> tuple[list[Correction], dict[str, list[Query]]]:
    records, _ = load_corrections(data_dir() / "counterfact" / "val.json", limit=n)
    return records, {
        "own": [Query(c.prompt, i) for i, c in enumerate(records)],
        "paraphrase": [Query(r, i) for i, c in enumerate(records) for r in c.rephrases],
        "neighbourhood": [Query(lp.prompt, NONE) for c in records for lp in c.locality_prompts],
    }


def measured(editable, ref: Reference, tau: float, margin: float, records: list[Correction],
             queries: dict[str, list[Query]], taus: list[float | None]) -> dict:
    memory = Memory(ref.layer, tau, ref.centre, tuple(entries(editable, [(c.id, {}) for c in records], records, ref)),
                    margin)
    out: dict = {"entries": len(records)}
    for kind, qs in queries.items():
        states = prompt_states(editable, [q.text for q in qs], ref.layer)
        owners = torch.tensor([q.owner for q in qs])
        texts = [q.text for q in qs]
        row: dict = {"queries": len(qs)}
        for relation_tau in taus:
            chosen = route_queries(states, memory.centre, memory.unit_keys, memory.unit_leads, memory.unit_relations,
                                   memory.floors, tau, margin, texts, memory.names, memory.subject_index, relation_tau)
            name = "none" if relation_tau is None else str(relation_tau)
            wrong = (chosen != NONE) & (chosen != owners)
            row[name] = {"to_own": round(((chosen == owners) & (owners != NONE)).float().mean().item(), 4),
                         "to_other": round(wrong.float().mean().item(), 4)}
            if relation_tau is None:  # the relation cosine of what the served rule routes (or should)
                target = torch.where(owners != NONE, owners, chosen)
                has = target != NONE
                near = (query_ends(states, memory.centre)[has] * memory.unit_relations[target[has]]).sum(-1)
                row["relation_cosine"] = {q: round(near.quantile(q).item(), 3) for q in (0.01, 0.05, 0.1, 0.5)} if has.any() else {}
                row["samples"] = [{"query": qs[i].text, "served_by": records[chosen[i]].prompt}
                                  for i in wrong.nonzero().flatten().tolist()[:4]]
        out[kind] = row
    return out


QUANTILES = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)


def separation(editable, layer: int, asked: dict[str, tuple[list[str], list[str]]]) -> dict[str, dict[str, float]]:
    """Per kind, quantiles of the cosine between each query's last state entering block `layer` and
    the last state of the prompt it is compared with (`asked`: kind -> (queries, their prompts))."""
    def ends(prompts: list[str]) -> torch.Tensor:
        return torch.stack([s[-1] for s in prompt_states(editable, prompts, layer)]).float()

    centre = ends(asked["paraphrase"][1]).mean(0)
    out = {}
    for kind, (queries, prompts) in asked.items():
        cos = (unit(ends(queries), centre) * unit(ends(prompts), centre)).sum(-1)
        out[kind] = {str(q): round(cos.quantile(q).item(), 3) for q in QUANTILES}
    return out


def compared(records: list[Correction], queries: list[Query]) -> tuple[list[str], list[str]]:
    """Each query beside the prompt of its owner."""
    return [q.text for q in queries], [records[q.owner].prompt for q in queries]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=500, help="CounterFact val records")
    parser.add_argument("--taus", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--layers", type=int, nargs="*", default=[], help="blocks to read the relation cosine at")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "work" / "served")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    home = Home(args.work / "home")
    rt = Runtime.open(home, provisioned(home, MODEL))  # the default profile: a routed memory
    editable, ref, cfg = rt.editable, rt.reference, rt.config.editor
    taus: list[float | None] = [None, *args.taus]
    sets = {"known": known_set(random.Random(args.seed), load_relations(data_dir())), **pair_sets(),
            "counterfact": counterfact_set(args.n)}
    summary = {"model": MODEL, "tau": cfg.routing_tau, "margin": cfg.routing_margin,
               "sets": {name: measured(editable, ref, cfg.routing_tau, cfg.routing_margin, records, queries, taus)
                        for name, (records, queries) in sets.items()}}
    known, asked = sets["known"]
    cf, cf_asked = sets["counterfact"]
    kinds = {"paraphrase": compared(known, asked["paraphrase"]),
             "other": ([q.text for q in asked["other"]], [c.prompt for c in known]),  # the i-th asks about fact i
             "counterfact_paraphrase": compared(cf, cf_asked["paraphrase"])}
    summary["relation_cosine_by_layer"] = {str(layer): separation(editable, layer, kinds) for layer in args.layers}
    report(summary, args.out)


if __name__ == "__main__":
    sys.exit(main())
