"""A routed memory's entries, made small: fewer ranks and fewer bits per factor (issue #22).

An entry's change to a tensor is ΔW = scale · outputsᵀ·inputs with one rank per token MEND saw
(about ten), ~220 KB an entry in bfloat16. Two steps shrink it, both applied when the entry is
made, so the gate judges exactly what is stored and served:

- `best_rank`: the rank-k update nearest to ΔW (Eckart–Young), from an SVD of the small r x r
  core left once each factor is reduced by QR;
- `rounded`: every factor held as `bits`-bit integer codes with one bfloat16 absmax scale per
  GROUP values along a row. The rounding is idempotent (rounding a rounded factor
  changes nothing, bit for bit), so the store can tell a rounded factor from its values alone and
  keep it as codes (`held_in`, `to_bytes`/`from_bytes`): no format flag travels with the entry.

The memory keeps an entry so in RAM as well (`CompactUpdate`: the stored codes, ~7x smaller than
float32), and widens its factors only when a forward pass reads them: at T = 10,000 float32 factors
held ~1.3 GB (bench/results/README.md).

bench/results/memory_compression*.json measures what each choice costs.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from editors.settings import Compression
from editors.types import LowRankUpdate


GROUP = 32  # values per scale along a factor's row


def compressed(update: LowRankUpdate, how: Compression) -> LowRankUpdate:
    """`update` as a compressed entry keeps it (its scale folded into the outputs, so the store need
    not keep one)."""
    update = replace(update, outputs=update.outputs * update.scale, scale=1.0)
    if how.rank is not None:
        update = best_rank(update, how.rank)
    if how.bits is None:
        return replace(update, inputs=update.inputs.bfloat16().float(), outputs=update.outputs.bfloat16().float())
    return replace(update, inputs=rounded(update.inputs, how.bits), outputs=rounded(update.outputs, how.bits))


def best_rank(update: LowRankUpdate, rank: int) -> LowRankUpdate:
    """The rank-`rank` update nearest to `update` (Frobenius), its singular values split evenly
    between the two factors so that both have the same scale (for rounding)."""
    if update.inputs.shape[0] <= rank:
        return update
    q_out, r_out = torch.linalg.qr(update.outputs.float().T)  # [out, r], [r, r]
    q_in, r_in = torch.linalg.qr(update.inputs.float().T)  # [in, r], [r, r]
    u, s, vh = torch.linalg.svd(r_out @ r_in.T)
    root = s[:rank].sqrt()
    return replace(update, inputs=(q_in @ vh[:rank].T * root).T.contiguous(),
                   outputs=(q_out @ u[:, :rank] * root).T.contiguous())


def _levels(bits: int) -> int:
    return 2 ** (bits - 1) - 1  # symmetric: 7 for 4 bits, 127 for 8


def codes(factor: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`factor` [k, n] (n a multiple of GROUP) as integer codes [k, n] (int8) and bfloat16 scales
    [k, n / GROUP]; None when it is not shaped for it."""
    if factor.dim() != 2 or factor.shape[1] % GROUP:
        return None
    grouped = factor.float().reshape(factor.shape[0], -1, GROUP)
    # A bfloat16 scale s gives the group's largest value the code exactly ±levels: levels·s and
    # levels·s / levels are exact in float32, so rounding again finds the same s and codes.
    scales = (grouped.abs().amax(-1) / _levels(bits)).bfloat16()
    safe = scales.float().clamp(min=torch.finfo(torch.float32).tiny)[..., None]
    ints = (grouped / safe).round().clamp(-_levels(bits), _levels(bits)).to(torch.int8)
    return ints.reshape(factor.shape), scales


def from_codes(ints: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 factor that `codes` describes."""
    k, n = ints.shape
    grouped = ints.float().reshape(k, scales.shape[1], n // scales.shape[1])
    return (grouped * scales.float()[..., None]).reshape(k, n)


def rounded(factor: torch.Tensor, bits: int) -> torch.Tensor:
    """`factor` as `bits`-bit codes with a scale per GROUP values hold it (in bfloat16 if its rows
    do not divide into groups)."""
    coded = codes(factor, bits)
    return from_codes(*coded) if coded is not None else factor.bfloat16().float()


def held_in(factor: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The codes and scales that hold `factor` exactly at `bits`, or None."""
    coded = codes(factor, bits)
    return coded if coded is not None and torch.equal(from_codes(*coded), factor.float()) else None


def to_bytes(ints: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes and scales as one uint8 tensor [k, n·bits/8 + n/16]: each row's codes (4-bit ones two to
    a byte) followed by its bfloat16 scales' bytes. One tensor, because a safetensors file spends
    about 100 bytes of header on every tensor it holds."""
    codes_ = packed(ints) if bits == 4 else ints.view(torch.uint8)
    return torch.cat([codes_, scales.contiguous().view(torch.uint8)], 1)


def from_bytes(row_bytes: torch.Tensor, bits: int) -> torch.Tensor:
    """The float32 factor `to_bytes` stored (n follows from the width: n·(bits/8 + 1/16) bytes a row)."""
    n = row_bytes.shape[1] * 16 // (2 * bits + 1)
    width = n * bits // 8
    ints = unpacked(row_bytes[:, :width]) if bits == 4 else row_bytes[:, :width].contiguous().view(torch.int8)
    return from_codes(ints, row_bytes[:, width:].contiguous().view(torch.bfloat16))


def packed(ints: torch.Tensor) -> torch.Tensor:
    """4-bit codes (in -7..7), two to a byte: [k, n] int8 -> [k, n / 2] uint8."""
    nibbles = (ints + 8).to(torch.uint8)
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def unpacked(bytes_: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes `packed` stored."""
    low = (bytes_ & 0x0F).to(torch.int8) - 8
    high = (bytes_ >> 4).to(torch.int8) - 8
    return torch.stack([low, high], -1).reshape(bytes_.shape[0], -1)


def narrowest(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in bfloat16 or float16 when either holds its float32 values exactly."""
    if tensor.dtype != torch.float32:
        return tensor
    for narrow in (torch.bfloat16, torch.float16):
        if torch.equal(tensor.to(narrow).float(), tensor):
            return tensor.to(narrow)
    return tensor


def widened(tensor: torch.Tensor) -> torch.Tensor:
    """A half-precision tensor as float32 (what `narrowest` narrowed); any other as it is."""
    return tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor


@dataclass(frozen=True)
class CompactFactor:
    """A factor in the fewest bytes that hold its values exactly, as the store keeps it: 4- or 8-bit
    codes and scales in one uint8 tensor (`to_bytes`), else its narrowest float type."""

    held: torch.Tensor
    bits: int | None = None  # the codes' bits; None: `held` is the factor itself

    def wide(self) -> torch.Tensor:
        """The factor as a forward pass takes it (float32 unless it was kept as another type)."""
        return from_bytes(self.held, self.bits) if self.bits is not None else widened(self.held)


def wide_all(factors: list[CompactFactor]) -> list[torch.Tensor]:
    """Each factor widened, those of one kind (bits, row width, type) in one go: a pass over 64
    rows widens its entries' factors in a few unpackings rather than one per factor (~20x faster).
    Elementwise, so each is the factor its own `wide` gives, bit for bit."""
    kinds: dict[tuple, list[int]] = {}
    for i, factor in enumerate(factors):
        kinds.setdefault((factor.bits, factor.held.shape[1:], factor.held.dtype), []).append(i)
    out: list[torch.Tensor] = [torch.empty(0)] * len(factors)
    for (bits, _, _), members in kinds.items():
        wide = CompactFactor(torch.cat([factors[i].held for i in members]), bits).wide()
        for i, part in zip(members, wide.split([len(factors[i].held) for i in members])):
            out[i] = part
    return out


def compact(factor: torch.Tensor) -> CompactFactor:
    for bits in (4, 8):
        held = held_in(factor, bits)
        if held is not None:
            return CompactFactor(to_bytes(*held, bits), bits)
    return CompactFactor(narrowest(factor))


@dataclass(frozen=True)
class CompactUpdate:
    """A LowRankUpdate as a routed memory keeps it in RAM: its factors compact, widened each time
    they are read (a forward pass reads only the entries its rows route to, so the float32 copies
    live no longer than the pass)."""

    compact_inputs: CompactFactor
    compact_outputs: CompactFactor
    scale: float | torch.Tensor = 1.0
    transposed: bool = False

    @property
    def inputs(self) -> torch.Tensor:
        return self.compact_inputs.wide()

    @property
    def outputs(self) -> torch.Tensor:
        return self.compact_outputs.wide()

    def nbytes(self) -> int:
        return self.compact_inputs.held.nbytes + self.compact_outputs.held.nbytes

    def widened(self) -> LowRankUpdate:
        return LowRankUpdate(self.inputs, self.outputs, self.scale, self.transposed)


def compact_update(update: LowRankUpdate | CompactUpdate) -> CompactUpdate:
    if isinstance(update, CompactUpdate):
        return update
    return CompactUpdate(compact(update.inputs), compact(update.outputs), update.scale, update.transposed)
