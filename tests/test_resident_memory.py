"""Resident memory that does not grow with the history (issue #34): a routed memory's entries kept
compact in RAM and widened only where a forward pass uses them, and every cache within the bytes
its configuration gives it."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from daemon.config import ConfigError, load_config
from daemon.home import Home
from daemon.stored_form import entry_from_stored, entry_to_stored
from editors import routing
from editors.compression import CompactUpdate, compact, compressed, rounded, wide_all
from editors.editable import Editable
from editors.memory_model import stack_rows
from editors.routing import Entry, Memory, Routed
from editors.settings import CacheBudgets, Compression
from editors.types import Correction, LowRankUpdate

SMOLLM2_SHAPES = {  # the MLP tensors of SmolLM2-135M's last 3 blocks: [out, in]
    f"model.layers.{block}.mlp.{name}.weight": shape
    for block in (27, 28, 29)
    for name, shape in (("gate_proj", (1536, 576)), ("up_proj", (1536, 576)), ("down_proj", (576, 1536)))}


def _entry_bytes(entry: Entry) -> int:
    """The bytes of tensors an entry holds."""
    states = [s for s in (entry.key, entry.lead, entry.relation) if s is not None]
    return sum(u.nbytes() for u in entry.update.values()) + sum(s.nbytes for s in states)


def _float32_bytes(entry: Entry) -> int:
    return sum(u.inputs.nbytes + u.outputs.nbytes for u in entry.update.values())


def test_an_entry_of_smollm2_s_shapes_read_from_the_store_holds_under_40_kb() -> None:
    generator = torch.Generator().manual_seed(0)
    update = {name: compressed(LowRankUpdate(torch.randn(6, n_in, generator=generator) * 1e-2,
                                             torch.randn(6, n_out, generator=generator) * 1e-2, 1.5), Compression())
              for name, (n_out, n_in) in SMOLLM2_SHAPES.items()}
    key = torch.randn(576, generator=generator).half().float()
    entry = entry_from_stored(entry_to_stored(Entry("a", key, 0.5, update, "Rome", key.flip(0), key, "France")))
    assert _entry_bytes(entry) < 40_000
    assert _float32_bytes(entry) > 130_000  # as it was held before


def test_an_entry_built_in_the_cycle_keeps_its_factors_as_4_bit_codes(tiny) -> None:
    """The tiny Llama's factors: 4-bit codes and a bfloat16 scale per 32 values, 0.5625 of a byte a
    value against float32's 4."""
    torch.manual_seed(0)
    update = {e.name: LowRankUpdate(torch.randn(5, e.in_features), torch.randn(5, e.out_features), 0.1)
              for e in tiny.anatomy.editable}
    correction = Correction("a", "The capital of France is", "Rome", subject="France")
    ref = routing.reference(tiny, ["Hello there my friend", "What is the time now"], 1)
    [entry] = routing.entries(tiny, [("a", update)], [correction], ref, Compression())
    assert all(isinstance(u, CompactUpdate) and u.compact_inputs.bits == 4 for u in entry.update.values())
    assert sum(u.nbytes() for u in entry.update.values()) == pytest.approx(_float32_bytes(entry) * 0.5625 / 4)


def test_factors_widened_at_use_are_the_stored_values_bit_for_bit() -> None:
    generator = torch.Generator().manual_seed(1)
    for how in (Compression(), Compression(bits=8), Compression(bits=None), Compression(rank=None, bits=None)):
        update = compressed(LowRankUpdate(torch.randn(4, 64, generator=generator), torch.randn(4, 96, generator=generator),
                                          0.5), how)
        entry = Entry("a", torch.zeros(8), 0.5, {"w": update})
        for kept in (entry, entry_from_stored(entry_to_stored(entry))):
            assert torch.equal(kept.update["w"].inputs, update.inputs)
            assert torch.equal(kept.update["w"].outputs, update.outputs)
            assert kept.update["w"].inputs.dtype == torch.float32


def test_factors_widened_together_are_those_widened_one_by_one() -> None:
    generator = torch.Generator().manual_seed(4)
    factors = [compact(rounded(torch.randn(rank, width, generator=generator), bits) if bits else
                       torch.randn(rank, width, generator=generator))
               for bits, rank, width in [(4, 2, 64), (4, 1, 64), (8, 2, 64), (4, 2, 96), (None, 2, 64), (4, 2, 64)]]
    assert [f.bits for f in factors] == [4, 4, 8, 4, None, 4]
    assert all(torch.equal(together, f.wide()) for together, f in zip(wide_all(factors), factors))


def test_served_logits_from_compact_entries_equal_those_of_float32_factors(tiny) -> None:
    torch.manual_seed(2)
    update = {e.name: compressed(LowRankUpdate(torch.randn(5, e.in_features), torch.randn(5, e.out_features), 0.5),
                                 Compression()) for e in tiny.anatomy.editable}
    correction = Correction("a", "The capital of France is", "Rome", subject="France")
    ref = routing.reference(tiny, ["Hello there my friend", "What is the time now", "A cat sat on a mat"], 1)
    [built] = routing.entries(tiny, [("a", update)], [correction], ref)
    memory = Memory(1, 0.99, ref.centre, (Entry("a", built.key, -1.0, update),))
    batch = tiny.batch([(correction.prompt, correction.target_new), ("Some unrelated thing", "x")])
    assert tiny.routes(batch, memory).tolist() == [0, routing.NONE]
    float32 = stack_rows([{name: (u.inputs, u.outputs * u.scale) for name, u in update.items()}, None])
    expected = tiny.anatomy.run_per_row(tiny.prefix_states(batch), batch.answer_positions, float32, None)
    tiny.weights_changed()  # no routed outputs kept from another test
    assert torch.equal(tiny.logits(batch, Routed(memory)), expected)


def test_no_cache_holds_more_bytes_than_its_budget(tiny) -> None:
    budgets = CacheBudgets(prefix_states=40_000, routed_outputs=40_000, similarities=200)
    editable = Editable(tiny.model, tiny.tokenizer, budgets=budgets)
    torch.manual_seed(3)
    update = {e.name: LowRankUpdate(torch.randn(2, e.in_features), torch.randn(2, e.out_features), 0.5)
              for e in tiny.anatomy.editable}
    ref = routing.reference(editable, ["Hello there my friend", "What is the time now"], 1)
    memory = Memory(1, -1.0, ref.centre, (Entry("a", ref.centre + 1, -1.0, update),))
    limits = asdict(budgets)
    filled = dict.fromkeys(limits, 0)
    for i in range(12):
        batch = editable.batch([(f"Prompt number {i} about thing {j}", "an answer") for j in range(3)])
        editable.logits(batch, Routed(memory))
        for name, held in editable.cache_bytes().items():
            assert held <= limits[name]
            filled[name] = max(filled[name], held)
    assert all(filled[name] > limits[name] / 2 for name in limits)  # each one filled up to its budget


def test_cache_budgets_come_from_the_configuration_and_are_checked_there(tmp_path: Path, monkeypatch) -> None:
    home = Home(tmp_path)
    home.config_path.write_text("caches:\n  prefix_states_bytes: 1000\n  similarities_bytes: 0\n", encoding="utf-8")
    monkeypatch.setenv("MENDD_CACHES__ROUTED_OUTPUTS_BYTES", "2000")
    assert load_config(home).caches.budgets() == CacheBudgets(1000, 2000, 0)
    monkeypatch.delenv("MENDD_CACHES__ROUTED_OUTPUTS_BYTES")
    home.config_path.write_text("caches:\n  prefix_states_bytes: -1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="caches.prefix_states_bytes"):
        load_config(home)
    home.config_path.write_text("", encoding="utf-8")
    assert load_config(home).caches.budgets() == CacheBudgets()
