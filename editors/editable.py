"""A model made ready for editing: its tokenizer, its editable tensors, and the prefix-state cache."""
from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from editors.anatomy import Anatomy, default_edit_modules
from editors.batching import TokenBatch, make_batch, rows_of
from editors.kept import BytesBudget
from editors.routing import Memory, Routed, SimilarityCache, chosen_entries, query_states, query_texts, row_factors
from editors.settings import CacheBudgets


ROUTED_ROWS = 64  # rows per routed suffix pass: each row's factors are padded to the largest rank


class Editable:
    """Runs the frozen prefix once per distinct sequence and the suffix as often as needed."""

    def __init__(self, model: nn.Module, tokenizer, edit_names: list[str] | None = None,
                 budgets: CacheBudgets = CacheBudgets()):
        self.model = model
        self.tokenizer = tokenizer
        self.edit_names = list(edit_names or default_edit_modules(model))
        self.anatomy = Anatomy(model, self.edit_names)
        config = model.config
        self.max_positions = getattr(config, "max_position_embeddings", None) or config.n_positions
        self.hidden_size = getattr(config, "hidden_size", None) or config.n_embd
        self._states = BytesBudget(budgets.prefix_states)  # (block, sequence) -> states entering the block
        self._outputs = RoutedOutputs(budgets.routed_outputs)
        self._similarities = SimilarityCache(budgets.similarities)

    def batch(self, pairs: list[tuple[str, str]]) -> TokenBatch:
        return make_batch(self.tokenizer, pairs)

    def prefix_states(self, batch: TokenBatch) -> torch.Tensor:
        """[batch, seq, hidden] entering the first edited block; cached per unpadded sequence, so a
        prompt seen before costs nothing (with NO_CACHES every call runs the prefix: the uncached
        reference that benchmarks compare against)."""
        return self.states_at(batch, self.anatomy.first)

    def states_at(self, batch: TokenBatch, block: int) -> torch.Tensor:
        """[batch, seq, hidden] entering `block` (at most the first edited one), cached as prefix_states is."""
        keys = [(block, tuple(row[:n].tolist())) for row, n in zip(batch.input_ids, batch.lengths)]
        found = {key: states for key in keys if (states := self._states.get(key)) is not None}
        missing = [i for i, key in enumerate(keys) if key not in found]
        if missing:
            fresh = self.anatomy.states_entering(batch.input_ids[missing], block)
            for i, states in zip(missing, fresh):
                kept = states[: len(keys[i][1])].clone()
                found[keys[i]] = kept
                self._states.put(keys[i], kept, kept.nbytes)
        out = torch.zeros(batch.input_ids.shape[0], batch.input_ids.shape[1], self.hidden_size)
        for i, key in enumerate(keys):
            out[i, : len(key[1])] = found[key]
        return out

    def routes(self, batch: TokenBatch, memory: Memory) -> torch.Tensor:
        """[batch]: the entry of `memory` serving each row (NONE: the base weights)."""
        with torch.no_grad():
            queries = query_states(self.states_at(batch, memory.layer), batch)
            key = (batch.running_text, *(tuple(ids[:n].tolist()) for ids, n in zip(batch.input_ids, batch.lengths)))
            # read at most once: by the similarity cache for new entries, by the relation reader for questions
            texts = functools.cache(lambda: query_texts(self.tokenizer, batch))
            sims = self._similarities.similarities(key, memory, queries, texts)
            return chosen_entries(memory, sims, queries, texts)

    def logits(self, batch: TokenBatch, weights: dict[str, torch.Tensor] | Routed | None = None,
               positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at `positions` (default: the answer positions), with optional replacement weights,
        or as a routed memory serves each row."""
        positions = batch.answer_positions if positions is None else positions
        if isinstance(weights, Routed):
            return self._routed_logits(batch, positions, weights)
        return self.anatomy.run(self.prefix_states(batch), positions, weights)

    def _routed_logits(self, batch: TokenBatch, positions: torch.Tensor, routed: Routed) -> torch.Tensor:
        """Each row as the entry it routes to serves it. On the model's own weights a (row, entry)
        pair is computed once: a gate's current and candidate memories share all but the new
        entries, and decision after decision asks for the same pairs."""
        memory = routed.memory
        parts = [rows_of(batch, rows) for rows in _chunks(len(batch.lengths), ROUTED_ROWS)]
        chosen = torch.cat([self.routes(part, memory) for part in parts])
        entries = [memory.entries[j] if j >= 0 else None for j in chosen.tolist()]
        keys = [(tuple(ids[:n].tolist()), tuple(where.nonzero()[:, 0].tolist()), id(entry))
                for ids, n, where, entry in zip(batch.input_ids, batch.lengths, positions, entries)]
        found = {} if routed.weights is not None else {i: self._outputs.get(key, entries[i]) for i, key in enumerate(keys)}
        missing = [i for i in range(len(keys)) if found.get(i) is None]
        for part in (missing[rows] for rows in _chunks(len(missing), ROUTED_ROWS)):
            sub = rows_of(batch, part)
            factors = row_factors(memory, chosen[part])
            logits = self.anatomy.run_per_row(self.prefix_states(sub), positions[part], factors, routed.weights)
            for i, rows in zip(part, logits.split(positions[part].sum(1).tolist())):
                found[i] = rows
                if routed.weights is None:
                    self._outputs.put(keys[i], entries[i], rows)
        return torch.cat([found[i] for i in range(len(keys))])

    def weights(self) -> dict[str, torch.Tensor]:
        return self.anatomy.current_weights()

    @contextmanager
    def using_weights(self, weights: dict[str, torch.Tensor]) -> Iterator[None]:
        """While inside, the model itself runs with `weights` (e.g. to generate with candidate
        weights); the served weights are put back on the way out."""
        params = dict(self.model.named_parameters())
        saved = {name: params[name].detach().clone() for name in weights}
        try:
            with torch.no_grad():
                for name, tensor in weights.items():
                    params[name].copy_(tensor)
            self.weights_changed()
            yield
        finally:
            with torch.no_grad():
                for name, tensor in saved.items():
                    params[name].copy_(tensor)
            self.weights_changed()

    def cache_bytes(self) -> dict[str, int]:
        """What each cache holds now, by its name in CacheBudgets (each within its budget)."""
        return {"prefix_states": self._states.bytes, "routed_outputs": self._outputs.bytes,
                "similarities": self._similarities.bytes}

    def cached_bytes(self) -> int:
        return sum(self.cache_bytes().values())

    def clear_cache(self) -> None:
        self._states.clear()
        self._outputs.clear()
        self._similarities.clear()

    def weights_changed(self) -> None:
        """The model's own weights were changed in place: forget routed outputs computed on them
        (prefix states, and routing similarities read from them, stay valid: only edited blocks change)."""
        self._outputs.clear()

def _chunks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


class RoutedOutputs:
    """Logits of (row, entry) pairs on the model's own weights, least recently used dropped first
    beyond a byte budget. An entry is keyed by identity and kept alive by its value, so a key
    never names another entry."""

    def __init__(self, budget_bytes: int = CacheBudgets.routed_outputs):
        self._kept = BytesBudget(budget_bytes)

    @property
    def bytes(self) -> int:
        return self._kept.bytes

    def get(self, key: tuple, entry) -> torch.Tensor | None:
        kept = self._kept.get(key)
        return kept[1] if kept is not None and kept[0] is entry else None

    def put(self, key: tuple, entry, logits: torch.Tensor) -> None:
        # a copy: a row split from a batch's logits would keep the whole batch's storage alive
        # (64 rows of the vocabulary), 50x more than the budget counts
        logits = logits.detach().clone()
        self._kept.put(key, (entry, logits), logits.nbytes)

    def clear(self) -> None:
        self._kept.clear()
