"""Least-squares aggregation: each correction's keys get the output its own update asks for, the
preserved keys move less than under the plain sum, and inside the null space the update is null on
the preserved directions."""
from __future__ import annotations

import pytest
import torch

from editors.aggregation import LeastSquaresEditor, own_values
from editors.editable import Editable
from editors.mend import MendEditor
from editors.projection import edit_inputs, key_covariance, null_space_projectors, preserved_batches
from editors.types import Correction

# no shared first token: the same key asked for two outputs gets their average
FACTS = [Correction("c1", "The capital of France is", "Rome"), Correction("c2", "Grass is usually", "blue")]


@pytest.fixture(scope="module")
def covariance(tiny):
    pairs = [("The weather today is", "sunny"), ("Water is made of", "hydrogen"), ("Dogs like to", "run")] * 6
    return key_covariance(tiny, preserved_batches(tiny, pairs, [list(range(5, 70))]))


def keys_of(tiny: Editable, correction: Correction) -> dict[str, torch.Tensor]:
    return edit_inputs(tiny, tiny.batch([(correction.prompt, correction.target_new)]))


def test_each_correction_gets_the_output_its_own_update_asks_for(tiny, covariance) -> None:
    mend = MendEditor.fresh(tiny, edit_lr=1e-2)
    own = {share.correction_ids[0]: share.low_rank for share in mend.propose(tiny, FACTS).shares}
    change = LeastSquaresEditor(mend, covariance, strength=1e-4, contexts=("",)).propose(tiny, FACTS).tensors()
    for fact in FACTS:
        for name, keys in keys_of(tiny, fact).items():
            wanted = own_values(own[fact.id][name], keys)
            got = keys @ change[name].T
            assert (got - wanted).norm() < 1e-2 * wanted.norm(), (fact.id, name)


def test_preserved_keys_move_less_than_under_the_sum(tiny, covariance) -> None:
    mend = MendEditor.fresh(tiny, edit_lr=1e-2)
    summed = mend.propose(tiny, FACTS).tensors()
    solved = LeastSquaresEditor(mend, covariance, strength=10.0).propose(tiny, FACTS).tensors()
    for name, cov in covariance.items():
        moved = lambda change: torch.trace(change @ cov.float() @ change.T)  # noqa: E731 - ||ΔW K0||²
        assert moved(solved[name]) < moved(summed[name]), name


def test_inside_the_null_space_the_update_leaves_the_preserved_directions_alone(tiny, covariance) -> None:
    projectors = null_space_projectors(covariance, 1e-2)
    editor = LeastSquaresEditor(MendEditor.fresh(tiny, edit_lr=1e-2), covariance, 10.0, projectors)
    change = editor.propose(tiny, FACTS).tensors()
    for name, projector in projectors.items():
        outside = torch.eye(projector.shape[0]) - projector
        assert (change[name] @ outside).norm() < 1e-4 * change[name].norm(), name
    assert editor.name == "mend+lsq+projection"


def test_a_least_squares_share_is_still_exactly_subtractable(tiny, covariance) -> None:
    editor = LeastSquaresEditor(MendEditor.fresh(tiny, edit_lr=1e-2), covariance, 10.0)
    both = editor.propose(tiny, FACTS)
    shares = [share.tensors() for share in both.shares if share.correction_ids != ("c1",)]
    remaining = both.without("c1").tensors()
    for name, tensor in shares[0].items():
        assert torch.allclose(remaining[name], tensor, atol=1e-7)
