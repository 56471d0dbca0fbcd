"""How small can a routed memory's entries get before the edits stop landing (issue #22)? Prints JSON.

N CounterFact val corrections are edited into one routed memory exactly as the service does
(default profile: SmolLM2-135M, the shipped editor, its batch size). Each entry's change is a
low-rank update per edited tensor (ΔW = scale · outputsᵀ·inputs, rank = the tokens MEND saw, about
ten), stored in bfloat16: ~220 KB an entry. Each variant rewrites every entry's factors and the
same served figures are read again:

- `rank k`: the best rank-k approximation of each ΔW (exact SVD of the small factors: QR of each
  side, SVD of the r x r core), bfloat16 factors;
- `rank k int8`: the same, each factor row quantized to int8 with its own absmax scale (float16);
  the bytes are counted as stored that way, the figures read from the dequantized factors.

Figures per variant: teacher-forced reliability and generalization; gen_prompt and gen_rephrase
(the target in a 20-token greedy continuation); nbhd_kept (neighbourhood prompts whose first 4
words equal the base model's: only the ones routed to some entry can differ, so only those are
generated again); bytes per entry (factors, and with the route tensors: key, lead, floor, target).
Keys and routing are the same in every variant.

    python bench/memory_compression.py [--n 100] [--ranks 1 2 3 4] [--out bench/results/memory_compression.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from daemon.config import load_config
from daemon.editor_jobs import edit_as_served
from daemon.home import Home
from daemon.provision import provision_home
from editors.editable import Editable
from editors.formats import load_corrections
from editors.memory_model import NONE
from editors.reading import first_words, mentions
from editors.routing import Entry, Memory
from editors.serving import serving_entries
from editors.types import LowRankUpdate
from policies.probes import data_dir
from policies.served_eval import Served
from store.models import load_model

MODEL = "smollm2-135m"
TOKENS = 20


# -- the compressions (pure) ------------------------------------------------------------------

def best_rank(update: LowRankUpdate, rank: int) -> LowRankUpdate:
    """The rank-`rank` update nearest to `update` (Frobenius), its singular values split evenly
    between the two factors so that both have the same scale (for quantizing)."""
    q_out, r_out = torch.linalg.qr(update.outputs.float().T)  # [out, r], [r, r]
    q_in, r_in = torch.linalg.qr(update.inputs.float().T)  # [in, r], [r, r]
    u, s, vh = torch.linalg.svd(r_out @ r_in.T)
    k = min(rank, len(s))
    root = s[:k].sqrt()
    outputs = (q_out @ u[:, :k] * root).T
    inputs = (q_in @ vh[:k].T * root).T
    return replace(update, inputs=inputs.bfloat16().float(), outputs=outputs.bfloat16().float())


def int8_rows(factor: torch.Tensor) -> torch.Tensor:
    """`factor` [k, n] as int8 with one float16 absmax scale per row would hold it, dequantized."""
    scale = (factor.abs().amax(-1, keepdim=True) / 127).half().float().clamp(min=1e-12)
    return (factor / scale).round().clamp(-127, 127) * scale


def quantized(update: LowRankUpdate) -> LowRankUpdate:
    return replace(update, inputs=int8_rows(update.inputs), outputs=int8_rows(update.outputs))


def factor_bytes(update: LowRankUpdate, int8: bool) -> int:
    values = update.inputs.numel() + update.outputs.numel()
    rows = update.inputs.shape[0] + update.outputs.shape[0]
    return values + 2 * rows if int8 else 2 * values


def route_bytes(entry: Entry) -> int:
    """As the store keeps them: key and lead float32, floor float64, target UTF-8."""
    return 4 * entry.key.numel() + (4 * entry.lead.numel() if entry.lead is not None else 0) + 8 + len(
        (entry.target or "").encode())


# -- measuring --------------------------------------------------------------------------------

def figures(served: Served, corrections, routed_neighbours: list[tuple[str, str]], base_near: list[str]) -> dict:
    reliability, generalization = served.teacher_forced(corrections)
    prompts = [c.prompt for c in corrections]
    rephrases = [(r, c.target_new) for c in corrections for r in c.rephrases]
    said = served.say(prompts + [r for r, _ in rephrases], TOKENS)
    hits = [mentions(text, target) for text, target in zip(said, [c.target_new for c in corrections] + [t for _, t in rephrases])]
    near = served.say([p for p, _ in routed_neighbours], TOKENS)
    changed = sum(first_words(a, 4) != first_words(b, 4) for a, b in zip(near, base_near))
    return {"reliability": round(reliability, 4), "generalization": round(generalization, 4),
            "gen_prompt": round(sum(hits[: len(prompts)]) / len(prompts), 4),
            "gen_rephrase": round(sum(hits[len(prompts):]) / max(len(rephrases), 1), 4),
            "nbhd_changed": changed, "samples": said[:3]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "work" / "compression")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    home = Home(args.work / "home")
    if not home.suites_path.exists():
        provision_home(home, MODEL)
    config = load_config(home)
    loaded = load_model(MODEL)
    editable = Editable(loaded.model, loaded.tokenizer, config.editor.edit_layers)
    records, _ = load_corrections(data_dir() / "counterfact" / "val.json", limit=args.n)
    print(f"editing {len(records)} corrections...", file=sys.stderr)
    served, edited = edit_as_served(home, config, editable, records, config.batch_size)
    memory: Memory = served.memory
    neighbours = [(lp.prompt, c.target_new) for c in edited for lp in c.locality_prompts]
    routes = serving_entries(editable, [p for p, _ in neighbours], memory)
    routed = [pair for pair, entry in zip(neighbours, routes) if entry != NONE]
    base_near = Served(editable).say([p for p, _ in routed], TOKENS)
    print(f"{len(routed)} of {len(neighbours)} neighbourhood prompts reach an entry", file=sys.stderr)

    def variant(change) -> tuple[Memory, tuple[Entry, ...]]:
        entries = tuple(replace(e, update={n: change(u) for n, u in e.update.items()}) for e in memory.entries)
        return replace(memory, entries=entries), entries

    rows: dict[str, dict] = {}
    plans = [("stored (bf16, full rank)", lambda u: u, False)]
    plans += [(f"rank {k}", lambda u, k=k: best_rank(u, k), False) for k in args.ranks]
    plans += [(f"rank {k} int8", lambda u, k=k: quantized(best_rank(u, k)), True) for k in args.ranks]
    for name, change, int8 in plans:
        print(name, file=sys.stderr)
        compressed, entries = variant(change)
        factors = sum(factor_bytes(u, int8) for e in entries for u in e.update.values()) / len(entries)
        route = sum(route_bytes(e) for e in entries) / len(entries)
        rows[name] = {"factor_kb_per_entry": round(factors / 1024, 1),
                      "mb_per_1000_entries": round((factors + route) * 1000 / 1e6, 1),
                      **figures(Served(editable, memory=compressed), edited, routed, base_near)}
        print(json.dumps(rows[name]), file=sys.stderr)
    summary = {"model": MODEL, "n": len(edited), "neighbourhood_prompts": len(neighbours),
               "neighbourhood_routed": len(routed), "bar_mb_per_1000": 25, "variants": rows,
               "seconds": round(time.perf_counter() - started)}
    text = json.dumps(summary, indent=1, ensure_ascii=False)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
