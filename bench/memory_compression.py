"""How small can a routed memory's entries get before the edits stop landing (issue #22)? Prints JSON.

N CounterFact val corrections are edited into one routed memory exactly as the service does
(default profile: SmolLM2-135M, the shipped editor, its batch size), uncompressed: each entry's
change is a low-rank update per edited tensor (ΔW = scale · outputsᵀ·inputs, rank = the tokens MEND
saw, about ten), ~220 KB an entry in bfloat16. Each variant then keeps every entry as the service
would with editor.memory_rank / memory_bits set so (editors/routing.kept_as: the best rank-k
approximation, factors as k-bit codes with a bfloat16 scale per 32 values, key and lead in float16,
floor from them), and the same served figures are read again:

- teacher-forced reliability and generalization; gen_prompt and gen_rephrase (the target in a
  20-token greedy continuation); nbhd_changed (neighbourhood prompts routed to some entry whose
  first 4 words differ from the base model's: only routed ones can differ);
- bytes per entry as the store writes them (daemon/versioning.entry_to_stored): factors alone,
  all tensors, and on disk (`mb_per_1000_entries`: chunk files of a batch's entries, as versions
  commit them, safetensors headers included).

    python bench/memory_compression.py [--n 100] [--plans 2:8 2:4 1:4] [--out bench/results/memory_compression.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from daemon.editor_jobs import edit_as_served
from daemon.home import Home
from daemon.provision import base_editable, provisioned
from daemon.stored_form import entry_to_stored, memory_chunk
from daemon.suite_files import routing_reference
from editors.formats import load_corrections
from editors.memory_model import NONE
from editors.reading import first_words, mentions
from editors.routing import Entry, Memory, kept_as
from editors.serving import serving_entries
from editors.settings import Compression
from policies.probes import data_dir
from policies.served_eval import Served
from report import report
from store.versions import write_shares

MODEL = "smollm2-135m"
TOKENS = 20


def stored_bytes(entry: Entry) -> int:
    """The bytes of `entry`'s tensors as the store writes them (daemon/versioning.entry_to_stored:
    factors in the narrowest form that holds them, key, lead, relation, floor, target)."""
    return sum(t.nbytes for t in entry_to_stored(entry).tensors.values())


def file_bytes(memory: Memory, entries: tuple[Entry, ...], per_version: int, folder: Path) -> int:
    """The bytes on disk of `entries` written as the store writes a version's chunk (`per_version`
    entries a file, as a cycle of that batch size commits them), safetensors headers included."""
    total = 0
    for start in range(0, len(entries), per_version):
        chunk = memory_chunk(memory, list(entries[start : start + per_version]))
        path = folder / f"{start}.safetensors"
        write_shares(path, chunk.shares, chunk.metadata, chunk.common)
        total += path.stat().st_size
    return total


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


def plan(text: str) -> tuple[int, int | None]:
    rank, bits = text.split(":")
    return int(rank), None if bits == "16" else int(bits)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--plans", type=plan, nargs="+", default=[plan(p) for p in ("2:8", "2:4", "1:4")],
                        help="rank:bits (bits 4, 8 or 16 = bfloat16)")
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "work" / "compression")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    home = Home(args.work / "home")
    config = provisioned(home, MODEL)
    # the memory as the editor makes it: every variant is compressed from the same entries
    config = config.model_copy(update={"editor": config.editor.model_copy(update={"memory_rank": None, "memory_bits": None})})
    editable = base_editable(config)
    records, _ = load_corrections(data_dir() / "counterfact" / "val.json", limit=args.n)
    print(f"editing {len(records)} corrections...", file=sys.stderr)
    served, edited = edit_as_served(home, config, editable, records, config.batch_size)
    memory: Memory = served.memory
    neighbours = [(lp.prompt, c.target_new) for c in edited for lp in c.locality_prompts]
    routes = serving_entries(editable, [p for p, _ in neighbours], memory)
    routed = [pair for pair, entry in zip(neighbours, routes) if entry != NONE]
    base_near = Served(editable).say([p for p, _ in routed], TOKENS)
    print(f"{len(routed)} of {len(neighbours)} neighbourhood prompts reach an entry", file=sys.stderr)

    reference = routing_reference(home, editable, config.editor.routing_layer)
    plans: list[tuple[str, Compression | None]] = [("stored (bf16, full rank)", None)]
    plans += [(f"rank {rank}" + (f" int{bits}" if bits else ""), Compression(rank, bits)) for rank, bits in args.plans]
    rows: dict[str, dict] = {}
    for name, how in plans:
        print(name, file=sys.stderr)
        entries = tuple(kept_as(e, reference, how) if how else e for e in memory.entries)
        per_entry = sum(stored_bytes(e) for e in entries) / len(entries)
        routes = sum(stored_bytes(replace(e, update={})) for e in entries) / len(entries)
        with tempfile.TemporaryDirectory() as folder:
            on_disk = file_bytes(memory, entries, config.batch_size, Path(folder)) / len(entries)
        rows[name] = {"factor_kb_per_entry": round((per_entry - routes) / 1024, 1),
                      "tensor_mb_per_1000_entries": round(per_entry * 1000 / 1e6, 1),
                      "mb_per_1000_entries": round(on_disk * 1000 / 1e6, 1),
                      **figures(Served(editable, memory=replace(memory, entries=entries)), edited, routed, base_near)}
        print(json.dumps(rows[name]), file=sys.stderr)
    summary = {"model": MODEL, "n": len(edited), "neighbourhood_prompts": len(neighbours),
               "neighbourhood_routed": len(routed), "bar_mb_per_1000": 25, "variants": rows,
               "seconds": round(time.perf_counter() - started)}
    report(summary, args.out)


if __name__ == "__main__":
    main()
