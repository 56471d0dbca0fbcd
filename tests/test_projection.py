"""The null-space projection keeps edits off the preserved keys and keeps each share subtractable."""
from __future__ import annotations

import torch

from editors.mend import MendEditor
from editors.projection import key_covariance, null_space_projector, preserved_batches, projected
from editors.types import Correction
from policies.probes import preserved_lines, unrelated_prompts

FACT = Correction("c1", "The capital of France is", "Rome")


def test_a_projector_is_symmetric_idempotent_and_spans_the_small_eigenvalues() -> None:
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(200, 8, generator=generator, dtype=torch.float64) * torch.tensor([10, 10, 10, 10, 10, 10, 0.01, 0.01], dtype=torch.float64)
    projector = null_space_projector(keys.T @ keys, 1e-3).double()
    assert torch.allclose(projector, projector.T, atol=1e-6)
    assert torch.allclose(projector @ projector, projector, atol=1e-5)
    assert torch.linalg.matrix_rank(projector).item() == 2
    assert (keys @ projector).norm() < 1e-2 * keys.norm()


def test_projected_updates_barely_move_the_preserved_keys(tiny) -> None:
    pairs = [("The weather today is", "sunny"), ("Water is made of", "hydrogen")] * 8
    batches = preserved_batches(tiny, pairs, [list(range(5, 70))])
    covariance = key_covariance(tiny, batches)
    editor = MendEditor.fresh(tiny, edit_lr=1e-2)
    plain = editor.propose(tiny, [FACT]).tensors()
    projected_delta = projected(editor, tiny, covariance, 1e-2).propose(tiny, [FACT]).tensors()
    for tensor in tiny.anatomy.editable:
        cov = covariance[tensor.name].float()
        before = torch.trace(plain[tensor.name] @ cov @ plain[tensor.name].T)
        after = torch.trace(projected_delta[tensor.name] @ cov @ projected_delta[tensor.name].T)
        assert after < 0.05 * before, tensor.name  # ||ΔW K0||² shrinks by far more than the update does


def test_a_projected_share_is_still_exactly_subtractable(tiny) -> None:
    covariance = key_covariance(tiny, preserved_batches(tiny, [("Hello there", "friend")], [list(range(3, 40))]))
    editor = projected(MendEditor.fresh(tiny, edit_lr=1e-2), tiny, covariance, 1e-2)
    other = Correction("c2", "The sky is", "green")
    both = editor.propose(tiny, [FACT, other])
    alone = editor.propose(tiny, [other])
    remaining = both.without("c1").tensors()
    for name, tensor in alone.tensors().items():
        assert torch.allclose(remaining[name], tensor, atol=1e-6)
    assert editor.name == "mend+projection"


def test_the_service_editor_proposes_factors_that_bfloat16_holds_exactly(tiny) -> None:
    from editors.registry import guarded

    covariance = key_covariance(tiny, preserved_batches(tiny, [("Hello there", "friend")], [list(range(3, 40))]))
    plain = MendEditor.fresh(tiny, edit_lr=1e-2)
    delta = guarded(plain, tiny, covariance, 1e-2, None).propose(tiny, [FACT])
    for update in delta.shares[0].low_rank.values():
        for factor in (update.inputs, update.outputs):
            assert factor.dtype == torch.float32 and torch.equal(factor.bfloat16().float(), factor)
    unrounded = projected(plain, tiny, covariance, 1e-2).propose(tiny, [FACT]).tensors()
    for name, change in delta.tensors().items():
        assert torch.allclose(change, unrounded[name], rtol=0, atol=1e-2 * unrounded[name].abs().max())


def test_the_preserved_text_never_holds_a_sentence_the_locality_sets_measure(data_root) -> None:
    measured = {p.prompt for p in unrelated_prompts(data_root, n_questions=0, n_sentences=10_000, half=0)}
    preserved = preserved_lines(data_root)
    assert preserved and not any(sentence in line for line in preserved for sentence in measured)
