"""A routed memory of single MEND edits, measured offline at T corrections: the lever for issue #7.

Summed into the weights, every accepted edit moves some unrelated answers, and the moves add up:
after a few edits the served model's locality against the base model has used the gate's margin
(`continual.py`). A routed memory (the GRACE / WISE idea) keeps the base weights for every query
that is not about an edited fact, so the damage no longer grows with the number of edits. This
benchmark measures that design before it is built into the service:

- each correction is edited alone on the base model by the service's editor (the shipped MEND
  network, the null-space projection, factors rounded for storage): one memory entry;
- its key is the hidden state entering block --layer at the subject's last token of its prompt
  (the prompt's last token when the subject is not in it), centred by the mean state of held-out
  prompts and scaled to unit length;
- (this bench measures the key alone; the service now also checks a lead and a margin, measured by
  bench/routing_precision.py)
- a query (a prompt) goes to the entry whose key is most similar to any of its token states from
  position 1 on (cosine), among the entries whose similarity reaches both τ and the entry's floor:
  the best similarity its key reached on held-out unrelated prompts (the training halves of zsRE's
  questions and of WikiText-2's sentences, never the measured sets). It then runs with that entry's
  update and no other, else with the base weights. Every --taus value is measured.

Measured with all T entries in the memory at once, as the issue asks of the final served model:
reliability and generalization (every correction, and the accepted ones: those whose own prompt and
rephrasings pass the gate's default reliability and generalization accept thresholds under routing),
neighborhood (CounterFact's neighbour prompt against the base model), locality (the gate suite's
733 prompts against the base model's argmax), ppl_drawdown (the gate's WikiText-2 sample; each chunk
is routed as one query), acceptance, and how the routing went.

    python bench/routed_memory.py [--n 1000] [--start 0] [--layer 8] [--taus 0.5 0.6 0.7 0.8 0.9]
    python bench/routed_memory.py --start 1000 --n 200 --routing-only --layers 8 10 12 14 16 18
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from daemon.home import Home
from daemon.provision import provisioned
from daemon.runtime import Runtime
from daemon.suite_files import load_keys
from editors import scoring
from editors.batching import TokenBatch, rows_of
from editors.formats import load_corrections
from editors.memory_model import choose, similarities, unit
from editors.mend import MendEditor
from editors.registry import guarded, pretrained_path
from editors.routing import key_span, prompt_states, query_states
from editors.types import LowRankUpdate
from policies.policy import load_policy
from policies.probes import data_dir, unrelated_prompts

MODEL = "smollm2-135m"
Entry = dict[str, LowRankUpdate]


# -- measuring ------------------------------------------------------------------------------------

def with_entry(base: dict[str, torch.Tensor], entry: Entry) -> dict[str, torch.Tensor]:
    return {name: base[name] + update.dense() for name, update in entry.items()}


Value = Callable[[list[int], dict | None], torch.Tensor]  # queries' values under some weights (None: base)


class Served:
    """A query set's values as the routed model serves them, for any routing: each (query, entry)
    pair is computed once, one suffix pass per entry, and the base values once."""

    def __init__(self, n: int, value: Value, entries: list[Entry | None], base: dict[str, torch.Tensor]):
        self.value, self.entries, self.base = value, entries, base
        self.base_values = torch.cat([value(idx, None) for idx in in_chunks(n)]) if n else torch.zeros(0)
        self.known: dict[tuple[int, int], float] = {}

    def under(self, routes: list[torch.Tensor]) -> None:
        """Compute every (query, entry) pair these routings need."""
        wanted: dict[int, set[int]] = {}
        for chosen in routes:
            for q, j in enumerate(chosen.tolist()):
                if j >= 0 and (q, j) not in self.known:
                    wanted.setdefault(j, set()).add(q)
        for j, queries in wanted.items():
            idx = sorted(queries)
            weights = with_entry(self.base, self.entries[j]) if self.entries[j] else None
            for q, v in zip(idx, self.value(idx, weights).tolist()):
                self.known[(q, j)] = v

    def values(self, chosen: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self.known[(q, j)] if j >= 0 else self.base_values[q].item()
                             for q, j in enumerate(chosen.tolist())])


def in_chunks(n: int, size: int = 64):
    for i in range(0, n, size):
        yield list(range(i, min(i + size, n)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1000, help="T: corrections in the memory")
    parser.add_argument("--start", type=int, default=0, help="first CounterFact val record")
    parser.add_argument("--layer", type=int, default=8, help="block whose entering hidden state keys the memory")
    parser.add_argument("--taus", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--step-scale", type=float, default=1.0,
                        help="multiplies the shipped editor's steps: a routed entry reaches only its own queries, "
                             "so it can afford a larger step than an edit summed into the weights")
    parser.add_argument("--routing-only", action="store_true", help="only how queries route, for each of --layers")
    parser.add_argument("--layers", type=int, nargs="+", default=None)
    parser.add_argument("--work", type=Path, default=Path("/tmp/mendd-routed"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    home = Home(args.work / "home")
    rt = Runtime.open(home, provisioned(home, MODEL))
    editable, gate = rt.editable, rt.gate
    editor = guarded(MendEditor.load(pretrained_path(MODEL), editable, args.step_scale), editable, load_keys(home),
                     rt.config.editor.projection_threshold, None)  # the service's editor, at this step scale
    records, _ = load_corrections(data_dir() / "counterfact" / "val.json", limit=args.start + args.n)
    records = records[args.start :]
    held_out = [p.prompt for p in unrelated_prompts(data_dir(), 300, 300, half=1)]
    queries = {
        "reliability": [(c.prompt, c.target_new, i) for i, c in enumerate(records)],
        "generalization": [(r, c.target_new, i) for i, c in enumerate(records) for r in c.rephrases],
        "neighborhood": [(lp.prompt, lp.answer, i) for i, c in enumerate(records) for lp in c.locality_prompts[:1]],
        "locality": [(p.prompt, p.answer, -1) for p in gate.suites.locality],
    }
    owners = {kind: torch.tensor([q[2] for q in qs]) for kind, qs in queries.items()}

    def similarity_sets(layer: int) -> dict[str, torch.Tensor]:
        held_out_states = prompt_states(editable, held_out, layer)
        centre = torch.cat(held_out_states).mean(0)
        edit_states = prompt_states(editable, [c.prompt for c in records], layer)
        keys = unit(torch.stack([s[min(key_span(editable.tokenizer, c)[1], len(s) - 1)]
                                 for c, s in zip(records, edit_states)]), centre)
        sims = {kind: similarities(prompt_states(editable, [q[0] for q in qs], layer), keys, centre) for kind, qs in queries.items()}
        sims["held_out"] = similarities(held_out_states, keys, centre)
        with torch.no_grad():
            text = query_states(editable.states_at(gate.text, layer), gate.text)
        sims["text"] = similarities(text, keys, centre)
        return sims

    def routing_figures(sims: dict[str, torch.Tensor], floors: torch.Tensor, tau: float) -> dict:
        row = {}
        for kind in ("reliability", "generalization"):
            row[f"{kind}_to_own_entry"] = (choose(sims[kind], floors, tau) == owners[kind]).float().mean().item()
        for kind in ("neighborhood", "locality", "text"):
            row[f"{kind}_routed"] = (choose(sims[kind], floors, tau) >= 0).float().mean().item()
        return {k: round(v, 4) for k, v in row.items()}

    summary = {"bench": "routed_memory", "model": MODEL, "n": args.n, "start": args.start, "step_scale": args.step_scale,
               "threads": args.threads}
    if args.routing_only:  # every correction counts as an entry: how queries route, not what entries do
        summary["routing_by_layer"] = {}
        for layer in args.layers or [args.layer]:
            sims = similarity_sets(layer)
            floors = sims["held_out"].max(0).values
            summary["routing_by_layer"][str(layer)] = {str(t): routing_figures(sims, floors, t) for t in args.taus}
            print(f"layer {layer}: {json.dumps(summary['routing_by_layer'][str(layer)])}", file=sys.stderr, flush=True)
        return finish(summary, args, started)

    # -- the memory: one entry per correction, edited alone on the base model -----------------
    entries: list[Entry | None] = []
    edit_seconds = []
    for i, correction in enumerate(records):
        t0 = time.perf_counter()
        delta = editor.propose(editable, [correction])
        edit_seconds.append(time.perf_counter() - t0)
        entries.append(delta.shares[0].low_rank if delta.shares else None)  # None: already answered so
        if i % 100 == 0:
            print(f"edit {i}/{len(records)} {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
    sims = similarity_sets(args.layer)
    live = torch.tensor([e is not None for e in entries])
    for kind in sims:  # an entry with no update (the model already answered so) is not in the memory
        sims[kind][:, ~live] = -2.0
    floors = sims["held_out"].max(0).values
    base = editable.weights()
    references = [p.reference for p in gate.suites.locality]

    def value_fn(kind: str) -> Value:
        pairs = [(q[0], q[1]) for q in queries[kind]]

        def value(idx: list[int], weights) -> torch.Tensor:
            batch: TokenBatch = editable.batch([pairs[i] for i in idx])
            rows, n = batch.row_of_answer, len(idx)
            with torch.no_grad():
                logits = editable.logits(batch, weights)
                if kind == "locality":
                    reference = torch.tensor([t for i in idx for t in references[i]])
                    return scoring.per_row_mean((logits.argmax(-1) == reference).float(), rows, n)
                if kind == "neighborhood":
                    return scoring.agreement(editable.logits(batch), logits, rows, n)
                return scoring.accuracy(logits, batch.answer_labels, rows, n)
        return value

    def text_nll(idx: list[int], weights) -> torch.Tensor:
        with torch.no_grad():
            chunks = [rows_of(gate.text, [i]) for i in idx]
            return torch.stack([scoring.token_nll(editable.logits(chunk, weights), chunk.answer_labels).sum() for chunk in chunks])

    served = {kind: Served(len(qs), value_fn(kind), entries, base) for kind, qs in queries.items()}
    served["text"] = Served(len(gate.text.lengths), text_nll, entries, base)
    for kind, table in served.items():
        table.under([choose(sims[kind], floors, tau) for tau in args.taus])
        print(f"measured {kind} {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)

    summary.update(layer=args.layer, edit_seconds_median=round(sorted(edit_seconds)[len(edit_seconds) // 2], 4),
                   entries=int(live.sum()), by_tau={})
    threshold = load_policy(None).threshold
    n_tokens = gate.text.answer_labels.numel()
    for tau in args.taus:
        got = {kind: table.values(choose(sims[kind], floors, tau)) for kind, table in served.items()}
        generalization_of = scoring.per_row_mean(got["generalization"], owners["generalization"], len(records))
        accepted = ((got["reliability"] >= threshold("reliability").accept)
                    & (generalization_of >= threshold("generalization").accept))
        row = {
            "reliability": got["reliability"][accepted].mean().item(),
            "generalization": got["generalization"][accepted[owners["generalization"]]].mean().item(),
            "locality": got["locality"].mean().item(),
            "ppl_drawdown": scoring.perplexity_change(got["text"].sum().item() / n_tokens, gate.suites.perplexity.base_nll),
            "acceptance": accepted.float().mean().item(),
            "reliability_all": got["reliability"].mean().item(),
            "generalization_all": got["generalization"].mean().item(),
            "neighborhood": got["neighborhood"].mean().item(),
            **routing_figures(sims, floors, tau),
        }
        summary["by_tau"][str(tau)] = {k: round(v, 4) for k, v in row.items()}
        print(f"tau {tau}: {json.dumps(summary['by_tau'][str(tau)])}", file=sys.stderr, flush=True)
    return finish(summary, args, started)


def finish(summary: dict, args, started: float) -> None:
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
