"""An exported routed version against mendd serving it (issue #21): next-token logits on the gate's
locality prompts, and greedy answers.

On a home with a routed memory (default: the demo's), the served version is exported with
`mendd export` and loaded in this process by plain transformers (`trust_remote_code`); each locality
prompt's next-token logits from the export's `forward` are compared with the gate's (mendd's
`Editable.logits` through the routed memory), and greedy 16-token answers from the export's
`generate` with mendd's (`editors/serving.py`) on the memory's own prompts and some locality ones.
Prints JSON: the largest absolute logit difference (bar <= 1e-4), how many prompts an entry served,
and how many answers differ.

    python bench/export_logits.py --home /tmp/mendd-demo [--prompts 733] [--out bench/results/export_logits.json]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from daemon.config import load_config
from daemon.home import Home
from daemon.runtime import Runtime
from editors.routing import NONE, Routed
from editors.serving import continuation, serving_entries
from store.ledger import Ledger
from report import report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=733, help="locality prompts compared")
    parser.add_argument("--answers", type=int, default=20, help="locality prompts whose answers are compared too")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    home = Home(args.home)
    rt = Runtime.open(home, load_config(home))
    try:
        tag = rt.served.tag
        folder = Path(tempfile.mkdtemp(prefix="mendd-export-")) / tag
        subprocess.run([str(Path(sys.executable).with_name("mendd")), "--home", str(home.root), "export", tag,
                        "--out", str(folder)], check=True, capture_output=True)
        exported = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        locality = [p.prompt for p in rt.gate.suites.locality][: args.prompts]
        worst, served = 0.0, 0
        routes = serving_entries(rt.editable, locality, rt.memory)
        for prompt, entry in zip(locality, routes):
            with torch.no_grad():
                ours = rt.editable.logits(rt.editable.batch([(prompt, "x")]), Routed(rt.memory))[0]
                theirs = exported(input_ids=tokenizer(prompt, return_tensors="pt").input_ids).logits[0, -1]
            worst = max(worst, (ours - theirs).abs().max().item())
            served += entry != NONE
        ledger = Ledger(home.ledger_url)
        try:
            own = [c.payload["prompt"] for c in ledger.corrections() if c.status.value == "applied"]
        finally:
            ledger.close()
        asked = own + locality[: args.answers]
        differ = []
        for prompt in asked:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            theirs = tokenizer.decode(exported.generate(ids, max_new_tokens=16)[0, ids.shape[1]:], skip_special_tokens=True).strip()
            ours = continuation(rt.editable, prompt, 16, rt.memory)
            if theirs != ours:
                differ.append({"prompt": prompt, "mendd": ours, "export": theirs})
    finally:
        rt.close()
    summary = {"version": tag, "entries": len(rt.memory.entries), "locality_prompts": len(locality),
               "served_by_an_entry": int(served), "max_abs_logit_difference": worst, "bar": 1e-4,
               "answers_compared": len(asked), "answers_differing": differ,
               "seconds": round(time.perf_counter() - started)}
    report(summary, args.out)


if __name__ == "__main__":
    main()
