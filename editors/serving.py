"""Answers from the served model, weights or routed memory: what a person or a check reads.

A routed memory is served per prompt: the prompt is routed once (editors/routing.py), and the
whole generation runs with the chosen entry's update added at the edited tensors (or with the
weights alone when no entry matches)."""
from __future__ import annotations

import torch

from editors.editable import Editable
from editors.routing import NONE, Memory, route, row_factors


def continuation(editable: Editable, prompt: str, tokens: int = 6, memory: Memory | None = None,
                 entry: int | None = None) -> str | None:
    """The greedy continuation of `prompt` (None for an empty one); with a memory, by the entry that
    serves it (`entry`, when the caller has routed it already)."""
    tokenizer, model = editable.tokenizer, editable.model
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        return None
    factors = {}
    if memory is not None:
        chosen = serving_entry(editable, prompt, memory) if entry is None else entry
        factors = row_factors(memory, torch.tensor([chosen]))
    with torch.inference_mode(), editable.anatomy.adding(factors):
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                                   pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True).strip()


def serving_entry(editable: Editable, prompt: str, memory: Memory) -> int:
    """The index of the memory entry that serves `prompt`, or NONE."""
    if not memory.entries:
        return NONE
    batch = editable.batch([(prompt, "x")])
    with torch.inference_mode():
        return route(memory, editable.states_at(batch, memory.layer), batch).item()
