"""The byte-bounded cache the editable keeps routed outputs and routing similarities in."""
from __future__ import annotations

from editors.kept import BytesBudget


def test_past_the_budget_the_least_recently_used_value_is_dropped() -> None:
    kept = BytesBudget(100)
    kept.put("a", 1, 40)
    kept.put("b", 2, 40)
    assert kept.get("a") == 1  # now "b" is the least recently used
    kept.put("c", 3, 40)
    assert (kept.get("a"), kept.get("b"), kept.get("c"), kept.bytes) == (1, None, 3, 80)


def test_a_value_put_again_replaces_its_bytes_and_a_zero_budget_keeps_nothing() -> None:
    kept = BytesBudget(100)
    kept.put("a", 1, 60)
    kept.put("a", 2, 30)
    assert (kept.get("a"), kept.bytes) == (2, 30)
    none = BytesBudget(0)
    none.put("a", 1, 1)
    assert (none.get("a"), none.bytes) == (None, 0)


def test_a_routed_output_keeps_its_own_rows_not_the_batch_they_were_split_from() -> None:
    import torch

    from editors.editable import RoutedOutputs

    batch_logits = torch.randn(64, 1000)
    outputs = RoutedOutputs(budget_bytes=10**6)
    entry = object()
    outputs.put(("row",), entry, batch_logits[3:4])
    kept = outputs.get(("row",), entry)
    assert torch.equal(kept, batch_logits[3:4])
    assert kept.untyped_storage().nbytes() == outputs.bytes == 1000 * 4
