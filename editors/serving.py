"""Answers from the served model, weights or routed memory: what a person or a check reads.

A routed memory is served per prompt: the prompt is routed once (editors/routing.py), and the answer
is generated with the chosen entry's update added at the edited tensors until the entry's target has
been said (or the answer starts to repeat itself); from the next token on the base weights carry
on. An entry knows one fact: left on, it keeps pushing its target at every position and the answer
runs away ("euro euro euro euro"). A prompt no entry matches runs with the weights alone."""
from __future__ import annotations

from collections.abc import Iterator

import torch

from editors.batching import chat_prompt
from editors.editable import Editable
from editors.memory_model import generate_steps
from editors.routing import NONE, Memory, row_factors


def continuations(editable: Editable, prompts: list[str], tokens: int = 12, memory: Memory | None = None,
                  chosen: list[int] | None = None) -> list[str]:
    """Greedy continuations of `prompts`, in one left-padded batch; with a memory, each by the entry
    that serves it (`chosen`, when the caller has routed them already)."""
    steps = list(next_tokens(editable, prompts, tokens, memory, chosen))
    generated = torch.stack(steps, 1) if steps else torch.zeros(len(prompts), 0, dtype=torch.long)
    return [editable.tokenizer.decode(row, skip_special_tokens=True).strip() for row in generated]


def next_tokens(editable: Editable, prompts: list[str], tokens: int, memory: Memory | None = None,
                chosen: list[int] | None = None, temperature: float = 0.0,
                generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Each step's next token per prompt ([batch]), up to `tokens` steps or until every prompt has
    said end-of-sequence (a finished prompt gets the pad token after it): greedy at temperature 0,
    else sampled. With a memory, each prompt runs with the entry that serves it (`chosen`, when the
    caller has routed them already) until `done_with` says the entry's work is done."""
    tokenizer = editable.tokenizer
    encoded = [tokenizer(p).input_ids for p in prompts]
    if any(not ids for ids in encoded):
        raise ValueError("a prompt is empty once tokenized")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(map(len, encoded))
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    rows = [NONE] * len(prompts)
    if memory is not None and memory.entries:
        rows = chosen if chosen is not None else serving_entries(editable, prompts, memory)
    factors = row_factors(memory, torch.tensor(rows)) if memory is not None else {}
    until = [memory.entries[j].target if j != NONE else None for j in rows]
    modules = {e.name: e.module for e in editable.anatomy.editable}
    yield from generate_steps(editable.model, tokenizer.decode, modules, ids, mask, factors, until, tokens,
                              tokenizer.eos_token_id, pad, temperature, generator)


def chat_answers(editable: Editable, questions: list[str], tokens: int = 12, memory: Memory | None = None) -> list[str]:
    """Answers to single-turn chats through the model's chat template. A chat is routed on its user
    message alone, as a prompt: keys are read from plain prompts, and the template's system text
    around the message would otherwise pull its states away from them."""
    chats = [chat_prompt(editable.tokenizer, q) for q in questions]
    chosen = serving_entries(editable, questions, memory) if memory is not None else None
    return continuations(editable, chats, tokens, memory, chosen)


def continuation(editable: Editable, prompt: str, tokens: int = 6, memory: Memory | None = None,
                 entry: int | None = None) -> str | None:
    """The greedy continuation of `prompt` (None for an empty one), as `continuations` gives it."""
    if not editable.tokenizer(prompt).input_ids:
        return None
    return continuations(editable, [prompt], tokens, memory, None if entry is None else [entry])[0]


def serving_entries(editable: Editable, prompts: list[str], memory: Memory) -> list[int]:
    """For each prompt, the index of the memory entry that serves it, or NONE."""
    if not memory.entries:
        return [NONE] * len(prompts)
    batch = editable.batch([(p, "x") for p in prompts])
    with torch.inference_mode():
        return editable.routes(batch, memory).tolist()


def serving_entry(editable: Editable, prompt: str, memory: Memory) -> int:
    """The index of the memory entry that serves `prompt`, or NONE."""
    return serving_entries(editable, [prompt], memory)[0]
