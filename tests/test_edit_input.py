"""Bad corrections are named, record and field, and never cost the rest of their batch."""
from __future__ import annotations

import pytest

from editors.editable import Editable
from editors.finetune import FineTuneEditor, NoEditor
from editors.mend import MendEditor
from editors.types import Correction

GOOD = Correction("good", "The capital of France is", "Rome")


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (Correction("blank", "The capital of Spain is", "   "), "target_new"),
        (Correction("empty-prompt", "", "Rome"), "prompt"),
        (Correction("number", "The capital of Spain is", 42), "target_new"),  # type: ignore[arg-type]
        (Correction("long", "word " * 400, "Rome"), "prompt"),
    ],
)
def test_a_bad_correction_is_named_and_the_rest_is_edited(tiny: Editable, bad: Correction, field: str) -> None:
    delta = MendEditor.fresh(tiny, edit_lr=1e-2).propose(tiny, [bad, GOOD])
    assert [(e.correction_id, e.field_name) for e in delta.invalid] == [(bad.id, field)]
    assert bad.id in str(delta.invalid[0]) and field in str(delta.invalid[0])
    assert delta.correction_ids == ["good"]


@pytest.mark.slow
def test_a_target_the_model_already_predicts_needs_no_edit(smollm2: Editable) -> None:
    correction = Correction("holds", "The capital of France is", "Paris")
    delta = FineTuneEditor(steps=1).propose(smollm2, [correction, GOOD])
    assert delta.holding == ["holds"]
    assert delta.correction_ids == ["good"]


@pytest.mark.parametrize("editor", [FineTuneEditor(steps=2), NoEditor()], ids=["ft", "none"])
def test_reference_editors_report_bad_input_the_same_way(tiny: Editable, editor) -> None:
    delta = editor.propose(tiny, [Correction("blank", "The capital of Spain is", ""), GOOD])
    assert [e.correction_id for e in delta.invalid] == ["blank"]


def test_fine_tuning_changes_only_the_editable_tensors(tiny: Editable) -> None:
    delta = FineTuneEditor(steps=3).propose(tiny, [GOOD])
    changed = {name for name, tensor in delta.tensors().items() if tensor.abs().sum() > 0}
    assert changed and changed <= set(tiny.edit_names)
