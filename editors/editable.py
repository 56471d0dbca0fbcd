"""A model made ready for editing: its tokenizer, its editable tensors, and the prefix-state cache."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from editors.anatomy import Anatomy, default_edit_modules
from editors.batching import TokenBatch, make_batch


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
        self._cache: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self._cache_size = cache_size

    def batch(self, pairs: list[tuple[str, str]]) -> TokenBatch:
        return make_batch(self.tokenizer, pairs)

    def prefix_states(self, batch: TokenBatch) -> torch.Tensor:
        """[batch, seq, hidden]; cached per unpadded sequence, so a prompt seen before costs nothing.

        With cache_size 0 nothing is kept and every call runs the prefix: the uncached reference
        that benchmarks compare against.
        """
        keys = [tuple(row[:n].tolist()) for row, n in zip(batch.input_ids, batch.lengths)]
        found = {key: self._cache[key] for key in keys if key in self._cache}
        missing = [i for i, key in enumerate(keys) if key not in found]
        if missing:
            fresh = self.anatomy.prefix_states(batch.input_ids[missing])
            for i, states in zip(missing, fresh):
                found[keys[i]] = states[: len(keys[i])].clone()
                self._remember(keys[i], found[keys[i]])
        out = torch.zeros(batch.input_ids.shape[0], batch.input_ids.shape[1], self.hidden_size)
        for i, key in enumerate(keys):
            if key in self._cache:
                self._cache.move_to_end(key)
            out[i, : len(key)] = found[key]
        return out

    def logits(self, batch: TokenBatch, weights: dict[str, torch.Tensor] | None = None,
               positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at `positions` (default: the answer positions), with optional replacement weights."""
        positions = batch.answer_positions if positions is None else positions
        return self.anatomy.run(self.prefix_states(batch), positions, weights)

    def weights(self) -> dict[str, torch.Tensor]:
        return self.anatomy.current_weights()

    def clear_cache(self) -> None:
        self._cache.clear()

    def _remember(self, key: tuple[int, ...], states: torch.Tensor) -> None:
        self._cache[key] = states
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
