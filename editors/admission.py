"""What any editor may edit: the corrections of a batch that are valid, fit the model's context, and
are not already said. MEND and fine-tuning both admit a batch this way before computing a change."""
from __future__ import annotations

import torch

from editors import scoring
from editors.batching import pair_ids
from editors.editable import Editable
from editors.types import Correction, Delta, EditInputError


def admissible(editable: Editable, corrections: list[Correction], delta: Delta) -> list[Correction]:
    """The corrections that need an edit; the others go into delta.invalid or delta.holding."""
    ready = []
    for correction in corrections:
        try:
            correction.validate()
            check_length(editable, correction)
        except EditInputError as error:
            delta.invalid.append(error)
            continue
        ready.append(correction)
    if not ready:
        return ready
    batch = editable.batch([(c.prompt, c.target_new) for c in ready])
    with torch.no_grad():
        acc = scoring.accuracy(editable.logits(batch), batch.answer_labels, batch.row_of_answer, len(ready))
    delta.holding.extend(c.id for c, a in zip(ready, acc) if a >= 1.0)
    return [c for c, a in zip(ready, acc) if a < 1.0]


def check_length(editable: Editable, correction: Correction) -> None:
    prompt_ids, answer_ids = pair_ids(editable.tokenizer, correction.prompt, correction.target_new)
    total = len(prompt_ids) + len(answer_ids)
    if total > editable.max_positions:
        raise EditInputError(
            correction.id, "prompt", f"prompt+target is {total} tokens, longer than the model's context of {editable.max_positions}"
        )
