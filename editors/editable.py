"""A model made ready for editing: its tokenizer, its editable tensors, and the prefix-state cache."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from editors.anatomy import Anatomy, default_edit_modules
from editors.batching import TokenBatch, make_batch, rows_of
from editors.routing import Routed, route, row_factors


ROUTED_ROWS = 64  # rows per routed suffix pass: each row's factors are padded to the largest rank


class Editable:
    """Runs the frozen prefix once per distinct sequence and the suffix as often as needed."""

    def __init__(self, model: nn.Module, tokenizer, edit_names: list[str] | None = None,
                 cache_size: int = 20_000):
        self.model = model
        self.tokenizer = tokenizer
        self.edit_names = list(edit_names or default_edit_modules(model))
        self.anatomy = Anatomy(model, self.edit_names)
        config = model.config
        self.max_positions = getattr(config, "max_position_embeddings", None) or config.n_positions
        self.hidden_size = getattr(config, "hidden_size", None) or config.n_embd
        self._caches: dict[int, OrderedDict[tuple[int, ...], torch.Tensor]] = {}  # block -> sequence -> states
        self._cache_size = cache_size

    def batch(self, pairs: list[tuple[str, str]]) -> TokenBatch:
        return make_batch(self.tokenizer, pairs)

    def prefix_states(self, batch: TokenBatch) -> torch.Tensor:
        """[batch, seq, hidden] entering the first edited block; cached per unpadded sequence, so a
        prompt seen before costs nothing.

        With cache_size 0 nothing is kept and every call runs the prefix: the uncached reference
        that benchmarks compare against.
        """
        return self.states_at(batch, self.anatomy.first)

    def states_at(self, batch: TokenBatch, block: int) -> torch.Tensor:
        """[batch, seq, hidden] entering `block` (at most the first edited one), cached as prefix_states is."""
        cache = self._caches.setdefault(block, OrderedDict())
        keys = [tuple(row[:n].tolist()) for row, n in zip(batch.input_ids, batch.lengths)]
        found = {key: cache[key] for key in keys if key in cache}
        missing = [i for i, key in enumerate(keys) if key not in found]
        if missing:
            fresh = self.anatomy.states_entering(batch.input_ids[missing], block)
            for i, states in zip(missing, fresh):
                found[keys[i]] = states[: len(keys[i])].clone()
                self._remember(cache, keys[i], found[keys[i]])
        out = torch.zeros(batch.input_ids.shape[0], batch.input_ids.shape[1], self.hidden_size)
        for i, key in enumerate(keys):
            if key in cache:
                cache.move_to_end(key)
            out[i, : len(key)] = found[key]
        return out

    def logits(self, batch: TokenBatch, weights: dict[str, torch.Tensor] | Routed | None = None,
               positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at `positions` (default: the answer positions), with optional replacement weights,
        or as a routed memory serves each row."""
        positions = batch.answer_positions if positions is None else positions
        if isinstance(weights, Routed):  # in row chunks: each row carries its own factors
            return torch.cat([self._routed_logits(rows_of(batch, rows), positions[rows], weights)
                              for rows in _chunks(len(batch.lengths), ROUTED_ROWS)])
        return self.anatomy.run(self.prefix_states(batch), positions, weights)

    def _routed_logits(self, batch: TokenBatch, positions: torch.Tensor, routed: Routed) -> torch.Tensor:
        chosen = route(routed.memory, self.states_at(batch, routed.memory.layer), batch)
        factors = row_factors(routed.memory, chosen)
        return self.anatomy.run_per_row(self.prefix_states(batch), positions, factors, routed.weights)

    def weights(self) -> dict[str, torch.Tensor]:
        return self.anatomy.current_weights()

    def clear_cache(self) -> None:
        self._caches.clear()

    def _remember(self, cache: OrderedDict, key: tuple[int, ...], states: torch.Tensor) -> None:
        cache[key] = states
        while len(cache) > self._cache_size:
            cache.popitem(last=False)


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]
