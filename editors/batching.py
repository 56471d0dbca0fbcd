"""Prompt+answer pairs as right-padded token batches with the positions that predict the answer."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

IGNORE = -100


@dataclass(frozen=True)
class TokenBatch:
    input_ids: torch.Tensor  # [batch, seq], right-padded
    labels: torch.Tensor  # [batch, seq]: labels[b, t] is the answer token predicted at t, else IGNORE

    lengths: torch.Tensor  # [batch]: real tokens per row
    running_text: bool = False  # text_batch: a routed memory routes each row on all of it, not on a prompt

    @property
    def real_positions(self) -> torch.Tensor:
        """Every position whose next token is real: where a whole-sequence KL is taken."""
        steps = torch.arange(self.input_ids.shape[1]).unsqueeze(0)
        return steps < (self.lengths.unsqueeze(1) - 1)

    @property
    def answer_positions(self) -> torch.Tensor:
        return self.labels != IGNORE

    @property
    def answer_labels(self) -> torch.Tensor:
        """The answer tokens in the order `logits[answer_positions]` yields them."""
        return self.labels[self.answer_positions]

    @property
    def row_of_answer(self) -> torch.Tensor:
        """For each answer token, the row (sequence) it belongs to."""
        return self.answer_positions.nonzero()[:, 0]


def answer_text(prompt: str, answer: str) -> str:
    """Byte-level BPE needs the space before an answer to belong to the answer."""
    if prompt[-1:].isspace() or answer[:1].isspace():
        return answer
    return " " + answer


def chat_prompt(tokenizer, question: str) -> str:
    """`question` as a single-turn chat, up to where the assistant's answer begins."""
    return chat_template_text(tokenizer, [{"role": "user", "content": question}])


def chat_template_text(tokenizer, messages: list[dict[str, str]]) -> str:
    """`messages` through the model's chat template, up to where the assistant's answer begins."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def pair_ids(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    answer_ids = tokenizer(answer_text(prompt, answer), add_special_tokens=False).input_ids
    return prompt_ids, answer_ids


def make_batch(tokenizer, pairs: list[tuple[str, str]], pad_id: int | None = None) -> TokenBatch:
    """Tokenize (prompt, answer) pairs; the answer is teacher-forced after its prompt."""
    rows = [pair_ids(tokenizer, p, a) for p, a in pairs]
    return batch_from_ids(rows, pad_id if pad_id is not None else _pad_id(tokenizer))


def batch_from_ids(rows: list[tuple[list[int], list[int]]], pad_id: int) -> TokenBatch:
    width = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for b, (prompt, answer) in enumerate(rows):
        seq = prompt + answer
        input_ids[b, : len(seq)] = torch.tensor(seq)
        start = len(prompt) - 1  # the last prompt token predicts the first answer token
        labels[b, start : start + len(answer)] = torch.tensor(answer)
    lengths = torch.tensor([len(p) + len(a) for p, a in rows])
    return TokenBatch(input_ids=input_ids, labels=labels, lengths=lengths)


def rows_of(batch: TokenBatch, rows: slice | list[int]) -> TokenBatch:
    """Some rows of a batch, padding kept (a routed row is judged as it was batched)."""
    return TokenBatch(batch.input_ids[rows], batch.labels[rows], batch.lengths[rows], batch.running_text)


def text_batch(chunks) -> TokenBatch:
    """Running text as a TokenBatch: the first token is the prompt, every later token an answer."""
    batch = batch_from_ids([(list(chunk[:1]), list(chunk[1:])) for chunk in chunks], pad_id=0)
    return replace(batch, running_text=True)


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0
