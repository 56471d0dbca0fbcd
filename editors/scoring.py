"""Per-sequence scores from answer-position logits (pure functions on tensors).

All take `logits` [n_answer_tokens, vocab] as produced at a TokenBatch's answer positions, the
answer labels, and `rows` (the sequence each answer token belongs to), and return one value per
sequence, averaged over its answer tokens (EasyEdit's convention).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def per_row_mean(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    total = torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows, values)
    count = torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows, torch.ones_like(values))
    return total / count.clamp(min=1)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, reduction="none")


def mean_nll(logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Mean negative log-likelihood of each sequence's answer."""
    return per_row_mean(token_nll(logits, labels), rows, n_rows)


def accuracy(logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Teacher-forced accuracy: the share of answer tokens that are the argmax."""
    return per_row_mean((logits.argmax(-1) == labels).float(), rows, n_rows)


def agreement(before: torch.Tensor, after: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Locality: the share of positions where the argmax did not change."""
    return per_row_mean((before.argmax(-1) == after.argmax(-1)).float(), rows, n_rows)


def kl_divergence(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Mean KL(before ‖ after) over positions; `before` is the reference distribution."""
    log_p = F.log_softmax(before.float(), -1)
    log_q = F.log_softmax(after.float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def perplexity_change(nll: float, base_nll: float) -> float:
    """Relative perplexity change; perplexity is exp(mean NLL), so it is exp(ΔNLL) - 1."""
    return math.exp(nll - base_nll) - 1
