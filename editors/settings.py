"""Editor settings (meta-training, a routed entry's compression, the editable's cache budgets);
torch-free, so the CLI and the configuration can show their defaults without importing torch."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 3000
    edits_per_step: int = 4
    lr: float = 1e-4  # editor network
    lr_lr: float = 1e-2  # per-layer log step sizes
    c_edit: float = 1.0
    c_loc: float = 1.0
    rank: int = 256
    edit_lr: float = 1e-4
    val_every: int = 250
    val_size: int = 50
    checkpoint_every: int = 100
    seed: int = 0
    grad_clip: float = 100.0
    # train through the service's null-space projection (editors/projection.py), so the editor learns
    # edits that still land once their input side is projected; None trains unprojected
    projection_threshold: float | None = None


@dataclass(frozen=True)
class Compression:
    """How a routed memory's entries are kept (editors/compression.py)."""

    rank: int | None = 2  # None: every rank the editor made
    bits: int | None = 4  # 4 or 8; None: bfloat16 factors


@dataclass(frozen=True)
class CacheBudgets:
    """Bytes each of the editable's caches may hold (editors/editable.py), least recently used dropped
    first beyond it; 0 keeps nothing. Their sum bounds what caching adds to the resident memory."""

    prefix_states: int = 512 * 2**20  # hidden states entering a block, per sequence (~2.3 KB a token for SmolLM2)
    routed_outputs: int = 512 * 2**20  # logits of (row, entry) pairs on the base weights (~200 KB an answer token)
    similarities: int = 256 * 2**20  # routing similarities of the gate's suites (10,000 entries: ~30 MB a suite)


NO_CACHES = CacheBudgets(0, 0, 0)  # every call computed afresh: the uncached reference benchmarks compare with
