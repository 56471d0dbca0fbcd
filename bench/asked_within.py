"""Where a query names its subject, and what routing on a query's last tokens does (issue #22).

An entry's key is read at its subject's last token, and a query's best position against it decides
the route. Running text names many subjects and asks about none of them: at T = 10,000 a 128-token
chunk of the perplexity sample reached the entry of "The headquarter of Guinness World Records is in
-> Paris" through a mention 56 tokens before the chunk's end. The rule: a key counts only among a
query's last ASKED_WITHIN positions (editors/memory_model.py).

1. distances: how many tokens lie between a record's subject (its last token, where the key is read)
   and the end of its prompt, rephrasings and questions, over CounterFact val, zsRE and MQuAKE: the
   window must reach every one of them.
2. with --beside HOME (a routed home, e.g. the continual run's): its served memory, the gate's
   perplexity sample and --chunks held-out chunks of 128 tokens (WikiText-2 test, the measuring half
   before the sample, as bench/continual.py's text_routed_heldout), routed by the rule as served and
   without the window (ASKED_WITHIN past any chunk's length), with what each routed chunk matched.

    python bench/asked_within.py [--beside bench/work/continual/mendd-routed] [--chunks 256] [--out F]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from daemon.config import load_config
from daemon.home import Home
from daemon.provision import provisioned
from daemon.runtime import Runtime
from editors import memory_model
from editors.batching import text_batch
from editors.formats import load_corrections
from editors.routing import NONE, key_span
from editors.types import Correction
from policies.probes import PERPLEXITY_FROM_LINE, data_dir, token_chunks, wikitext_lines
from report import report

MODEL = "smollm2-135m"
SETS = {"counterfact_val": "counterfact/val.json", "zsre": "zsre/zsre_mend-1k.json", "mquake": "mquake/MQuAKE-CF.json"}


def distances(tokenizer, records: list[Correction]) -> list[int]:
    """Per prompt, rephrasing or question that spells its record's subject: the tokens after the
    subject's last one (routing reads states from position 1, as key_span counts them)."""
    out = []
    for c in records:
        for text in (c.prompt, *c.rephrases):
            if c.subject and c.subject in text:
                _, last = key_span(tokenizer, Correction(c.id, text, c.target_new, subject=c.subject))
                out.append(len(tokenizer(text, add_special_tokens=False).input_ids) - 2 - last)
    return out


def summary_of(found: list[int]) -> dict:
    ranked = sorted(found)
    return {"texts": len(ranked), "median": ranked[len(ranked) // 2], "p99": ranked[int(0.99 * (len(ranked) - 1))],
            "max": ranked[-1]}


def routed_chunks(rt: Runtime, batch, within: int) -> dict:
    memory_model.ASKED_WITHIN, kept = within, memory_model.ASKED_WITHIN
    try:
        rt.editable.clear_cache()  # routing similarities cached under the other rule
        chosen = rt.editable.routes(batch, rt.memory).tolist()
    finally:
        memory_model.ASKED_WITHIN = kept
    hits = [(i, j) for i, j in enumerate(chosen) if j != NONE]
    return {"routed": round(len(hits) / len(chosen), 4), "chunks": len(chosen),
            "matched": [f"chunk {i}: {rt.memory.entries[j].correction_id} ({rt.memory.entries[j].subject} -> "
                        f"{rt.memory.entries[j].target})" for i, j in hits[:8]]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--beside", type=Path, default=None, help="a routed home whose served memory routes the text")
    parser.add_argument("--chunks", type=int, default=256, help="held-out chunks of 128 tokens")
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "work" / "served")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    home = Home(args.beside) if args.beside else Home(args.work / "home")
    rt = Runtime.open(home, load_config(home) if args.beside else provisioned(home, MODEL))
    tokenizer = rt.editable.tokenizer
    out: dict = {"asked_within": memory_model.ASKED_WITHIN, "distances": {}}
    for name, path in SETS.items():
        records, _ = load_corrections(data_dir() / path, limit=2000)
        out["distances"][name] = summary_of(distances(tokenizer, records))
    if args.beside:
        held = text_batch(token_chunks(wikitext_lines(data_dir())[0:PERPLEXITY_FROM_LINE:2], tokenizer, args.chunks, 128))
        out["beside"] = {"home": str(args.beside), "entries": len(rt.memory.entries)}
        for name, batch in (("perplexity_sample", rt.gate.text), ("heldout", held)):
            out["beside"][name] = {"served": routed_chunks(rt, batch, memory_model.ASKED_WITHIN),
                                   "without_window": routed_chunks(rt, batch, 10**9)}
    report(out, args.out)


if __name__ == "__main__":
    with torch.no_grad():
        sys.exit(main())
