"""Where the routed memory sends queries, with N CounterFact corrections' keys in one memory (issue #20/#22).

No editing: each record's entry is built exactly as the service builds it (editors/routing.py: key,
lead, floor against the home's pinned reference), with an empty update, and every query is routed as
the service routes it. Counted per query set: the share that goes to its own correction's entry and
the share that goes to another's (a false route: that entry's change then answers a prompt it is not
about). Query sets: the corrections' prompts and rephrasings, CounterFact's neighbourhood prompts
(same relation, another subject), the gate's locality suite and 64 chunks of 128 tokens of held-out
running text (WikiText-2 test, the measuring half before the gate's perplexity sample). Each rule is
measured: the key alone at τ 0.8 (the rule before leads), keys with leads at the given τ and
margins, and the served rule (keys, leads, and the query must name the entry's subject).

    python bench/routing_precision.py [--n 500] [--start 0] [--no-subject] [--rules 0.75:0.3 0.8:0.3]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from daemon.home import Home
from daemon.provision import provisioned
from daemon.runtime import Runtime
from editors.formats import load_corrections
from editors.memory_model import route_queries
from editors.batching import text_batch
from editors.routing import Memory, entries, prompt_states, query_states, query_texts
from policies.probes import PERPLEXITY_FROM_LINE, data_dir, token_chunks, wikitext_lines
from report import report

MODEL = "smollm2-135m"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--no-subject", action="store_true", help="drop every record's subject (routing guesses it)")
    parser.add_argument("--rules", nargs="+", default=["0.75:0.3", "0.8:0.3"], help="tau:margin with leads")
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "work" / "served")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)

    home = Home(args.work / "home")
    rt = Runtime.open(home, provisioned(home, MODEL))  # the default profile: a routed memory
    editable, ref = rt.editable, rt.reference
    records, _ = load_corrections(data_dir() / "counterfact" / "val.json", limit=args.start + args.n)
    records = records[args.start :]
    if args.no_subject:
        records = [replace(c, subject=None) for c in records]
    built = entries(editable, [(c.id, {}) for c in records], records, ref)
    keyed = Memory(ref.layer, 0.0, ref.centre, tuple(built))
    alone = replace(keyed, entries=tuple(replace(e, lead=None, relation=None, floor=ref.floor(e.key)) for e in built))
    queries = {
        "prompt": [(c.prompt, i) for i, c in enumerate(records)],
        "rephrase": [(r, i) for i, c in enumerate(records) for r in c.rephrases],
        "neighbourhood": [(lp.prompt, i) for i, c in enumerate(records) for lp in c.locality_prompts],
        "locality": [(p.prompt, -1) for p in rt.gate.suites.locality],
    }
    states = {kind: prompt_states(editable, [q for q, _ in qs], ref.layer) for kind, qs in queries.items()}
    chunks = token_chunks(wikitext_lines(data_dir())[0:PERPLEXITY_FROM_LINE:2], editable.tokenizer, 64, 128)
    text = text_batch(chunks)
    queries["text"] = [(t, -1) for t in query_texts(editable.tokenizer, text)]
    states["text"] = query_states(editable.states_at(text, ref.layer), text)

    def figures(memory: Memory, tau: float, margin: float, named: bool = False) -> dict[str, float]:
        out = {}
        for kind, qs in queries.items():
            texts, subjects, index = ([q for q, _ in qs], memory.names, memory.subject_index) if named else (None, None, None)
            chosen = route_queries(states[kind], memory.centre, memory.unit_keys, memory.unit_leads,
                                   memory.unit_relations, memory.floors, tau, margin, texts, subjects, index)
            owners = torch.tensor([owner for _, owner in qs])
            if owners.max() < 0:  # about no correction: any route is a false one
                out[f"{kind}_routed"] = round((chosen >= 0).float().mean().item(), 4)
                continue
            out[f"{kind}_to_own"] = round((chosen == owners).float().mean().item(), 4)
            out[f"{kind}_to_other"] = round(((chosen >= 0) & (chosen != owners)).float().mean().item(), 4)
        return out

    rules = {"key_alone tau 0.8": figures(alone, 0.8, 0.0)}
    for rule in args.rules:
        tau, margin = map(float, rule.split(":"))
        rules[f"key_and_lead tau {tau} margin {margin}"] = figures(keyed, tau, margin)
        rules[f"key_lead_and_subject tau {tau} margin {margin}"] = figures(keyed, tau, margin, named=True)
    summary = {"model": MODEL, "n": len(records), "start": args.start, "subject": not args.no_subject,
               "with_lead": sum(e.lead is not None for e in built), "rules": rules}
    report(summary, args.out)


if __name__ == "__main__":
    sys.exit(main())
