"""A routed entry made small: the nearest low-rank change, factors as 4- or 8-bit codes, and a store
that keeps them so, bit for bit."""
from __future__ import annotations

import pytest
import torch

from daemon.stored_form import entry_from_stored, entry_to_stored
from editors.compression import best_rank, compressed, from_bytes, held_in, packed, rounded, to_bytes, unpacked
from editors.routing import Entry
from editors.settings import Compression
from editors.types import LowRankUpdate


def _update(rank: int = 6, seed: int = 0) -> LowRankUpdate:
    generator = torch.Generator().manual_seed(seed)
    return LowRankUpdate(torch.randn(rank, 64, generator=generator), torch.randn(rank, 96, generator=generator), 0.5)


def test_the_best_rank_k_update_is_the_truncated_svd_of_the_change() -> None:
    update = _update()
    dense = update.dense()
    u, s, vh = torch.linalg.svd(dense)
    nearest = (u[:, :2] * s[:2]) @ vh[:2]
    torch.testing.assert_close(best_rank(update, 2).dense(), nearest, atol=1e-4, rtol=1e-4)


def test_an_update_of_rank_k_or_less_is_kept_as_it_is() -> None:
    update = _update(rank=2)
    assert best_rank(update, 2) is update


@pytest.mark.parametrize("bits", [4, 8])
def test_rounding_a_rounded_factor_changes_nothing(bits: int) -> None:
    once = rounded(torch.randn(3, 64) * 1e-3, bits)
    assert torch.equal(rounded(once, bits), once)


@pytest.mark.parametrize("bits, worst", [(4, 1 / 14), (8, 1 / 254)])
def test_a_rounded_value_is_within_half_a_step_of_its_group_s_largest(bits: int, worst: float) -> None:
    factor = torch.randn(2, 64)
    error = (rounded(factor, bits) - factor).abs().reshape(2, 2, 32)
    largest = factor.abs().reshape(2, 2, 32).amax(-1, keepdim=True)
    assert (error <= largest * worst * 1.01).all()


def test_a_factor_that_was_not_rounded_is_not_held_in_codes() -> None:
    assert held_in(torch.randn(2, 64), 4) is None
    assert held_in(torch.randn(2, 64), 8) is None


def test_a_factor_whose_rows_do_not_divide_into_groups_is_kept_in_bfloat16() -> None:
    factor = torch.randn(2, 40)
    assert torch.equal(rounded(factor, 4), factor.bfloat16().float())


def test_4_bit_codes_pack_two_to_a_byte_and_unpack_unchanged() -> None:
    ints = torch.randint(-7, 8, (3, 64), dtype=torch.int8)
    assert packed(ints).shape == (3, 32)
    assert torch.equal(unpacked(packed(ints)), ints)


@pytest.mark.parametrize("bits", [4, 8])
def test_codes_and_scales_stored_as_bytes_read_back_unchanged(bits: int) -> None:
    factor = rounded(torch.randn(3, 64), bits)
    stored = to_bytes(*held_in(factor, bits), bits)
    assert stored.dtype == torch.uint8 and stored.shape == (3, 64 * bits // 8 + 64 // 16)
    assert torch.equal(from_bytes(stored, bits), factor)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_compressed_entry_is_stored_as_codes_and_read_back_bit_for_bit(bits: int) -> None:
    update = compressed(_update(), Compression(rank=2, bits=bits))
    key = torch.randn(8).half().float()
    stored = entry_to_stored(Entry("a", key, 0.5, {"w": update}, "Rome", key.flip(0), key))
    factor_bytes = sum(t.numel() for name, t in stored.tensors.items() if name.startswith("w/"))
    assert factor_bytes == 2 * (64 + 96) * (bits // 8 if bits == 8 else 0.5) + 2 * (64 + 96) // 16
    assert stored.tensors["route/key"].dtype == torch.float16
    back = entry_from_stored(stored)
    assert torch.equal(back.update["w"].inputs, update.inputs)
    assert torch.equal(back.update["w"].outputs, update.outputs)
    assert back.update["w"].scale == 1.0 and not back.update["w"].transposed
    assert torch.equal(back.key, key) and back.key.dtype == torch.float32


def test_compressing_folds_the_scale_into_the_outputs() -> None:
    update = _update()
    folded = compressed(update, Compression(rank=None, bits=None))
    assert folded.scale == 1.0
    torch.testing.assert_close(folded.dense(), update.dense(), atol=0.05, rtol=0.02)


def test_an_uncompressed_share_keeps_its_scale_and_orientation() -> None:
    from daemon.stored_form import share_from_stored, share_to_stored
    from editors.types import Share

    update = LowRankUpdate(torch.randn(2, 5), torch.randn(2, 3), 0.25, transposed=True)
    back = share_from_stored(share_to_stored(Share(("a",), low_rank={"w": update}))).low_rank["w"]
    assert back.scale == 0.25 and back.transposed
    assert torch.equal(back.inputs, update.inputs) and torch.equal(back.outputs, update.outputs)
