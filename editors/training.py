"""Meta-training the MEND editor network.

Each step edits a few training corrections at once, then scores the edited model: the edit loss is
the answer NLL on the edit prompt and its rephrasings (the edit must generalise), the locality loss
is KL(pre-edit ‖ post-edit) at the answer positions of unrelated sequences (the head over every
position would cost four times as much on CPU, for positions no metric reads): the correction's own neighbourhood
prompt (same relation, same old answer: where edits spill over), another correction's prompt, and a
general unrelated prompt (a question or running text) when given.
Only the editor's parameters learn; the model is fixed.
"""
from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from editors import scoring
from editors.editable import Editable
from editors.mend import MendEditor
from editors.projection import project_update
from editors.settings import TrainSettings
from editors.types import Correction, LocalityPrompt


@dataclass
class TrainState:
    step: int = 0
    history: list[dict] = field(default_factory=list)  # one row per logged step
    validations: list[dict] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class StepLosses:
    total: float
    edit: float
    loc: float
    edit_success: float  # accuracy on the edit prompts after the edit


def edit_sequences(correction: Correction) -> list[tuple[str, str]]:
    return [(p, correction.target_new) for p in (correction.prompt, *correction.rephrases)]


def locality_sequences(correction: Correction, unrelated: Correction, general: LocalityPrompt | None) -> list[tuple[str, str]]:
    pairs = [(lp.prompt, lp.answer) for lp in correction.locality_prompts]
    if unrelated.target_old:
        pairs.append((unrelated.prompt, unrelated.target_old))
    if general is not None:
        pairs.append((general.prompt, general.answer))
    return pairs


def meta_loss(editable: Editable, editor: MendEditor, batch: list[Correction], unrelated: list[Correction],
              settings: TrainSettings, general: list[LocalityPrompt] | None = None,
              projectors: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, StepLosses]:
    """The MEND objective for one batch of edits; differentiable in the editor's parameters.

    With `projectors`, each update is projected as the service will project it before it is scored.
    """
    shares = editor.factors(editable, batch)
    base = editable.weights()
    edited = dict(base)
    for share in shares:
        for name, update in share.items():
            if projectors is not None:
                update = project_update(update, projectors[name])
            edited[name] = edited[name] + update.dense()

    outer = editable.batch([pair for c in batch for pair in edit_sequences(c)])
    logits = editable.logits(outer, edited)
    edit_nll = scoring.mean_nll(logits, outer.answer_labels, outer.row_of_answer, len(outer.lengths))
    success = scoring.accuracy(logits.detach(), outer.answer_labels, outer.row_of_answer, len(outer.lengths))

    general = general or [None] * len(batch)
    loc = editable.batch([pair for c, u, g in zip(batch, unrelated, general) for pair in locality_sequences(c, u, g)])
    with torch.no_grad():
        before = editable.logits(loc)
    after = editable.logits(loc, edited)
    loc_kl = scoring.kl_divergence(before, after)

    edit_loss = edit_nll.mean()
    total = settings.c_edit * edit_loss + settings.c_loc * loc_kl
    return total, StepLosses(total.item(), edit_loss.item(), loc_kl.item(), success.mean().item())


def train(editable: Editable, editor: MendEditor, train_set: list[Correction], settings: TrainSettings,
          checkpoint: Path, validate: Callable[[MendEditor], dict] | None = None,
          on_step: Callable[[TrainState, StepLosses], None] | None = None,
          general: list[LocalityPrompt] | None = None,
          projectors: dict[str, torch.Tensor] | None = None) -> TrainState:
    """Train (or resume from `checkpoint`) until settings.steps; returns the final state.

    `general` are unrelated prompts of other kinds (questions, running text) that the edits must
    also leave alone; one joins each edit's locality batch. `projectors` (per edited tensor) project
    every update before it is scored, as the service does with `editor.projection` on.
    """
    network = editor.network
    optimizer = torch.optim.Adam([
        {"params": [p for n, p in network.named_parameters() if n != "log_edit_lrs"], "lr": settings.lr},
        {"params": [network.log_edit_lrs], "lr": settings.lr_lr},
    ])
    state = TrainState()
    state_path = checkpoint.with_suffix(".state.pt")
    if checkpoint.exists() and state_path.exists():
        resumed = torch.load(state_path, weights_only=True)
        network.load_state_dict(resumed["network"])
        optimizer.load_state_dict(resumed["optimizer"])
        state = TrainState(**json.loads(resumed["state"]))
    rng = random.Random(settings.seed + state.step)
    usable = [c for c in train_set if c.rephrases and c.locality_prompts]
    started = time.monotonic() - state.seconds
    while state.step < settings.steps:
        network.train()
        batch = rng.sample(usable, settings.edits_per_step)
        unrelated = rng.sample(usable, settings.edits_per_step)
        others = rng.sample(general, settings.edits_per_step) if general else None
        loss, losses = meta_loss(editable, editor, batch, unrelated, settings, others, projectors)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), settings.grad_clip)
        optimizer.step()
        state.step += 1
        state.seconds = time.monotonic() - started
        state.history.append({"step": state.step, **asdict(losses), "seconds": round(state.seconds, 2)})
        if on_step:
            on_step(state, losses)
        if validate and (state.step % settings.val_every == 0 or state.step == settings.steps):
            network.eval()
            state.validations.append({"step": state.step, **validate(editor)})
        if state.step % settings.checkpoint_every == 0 or state.step == settings.steps:
            save_checkpoint(editor, optimizer, state, checkpoint, settings)
    network.eval()
    return state


def save_checkpoint(editor: MendEditor, optimizer, state: TrainState, checkpoint: Path, settings: TrainSettings) -> None:
    """Editor weights as safetensors (what ships); optimizer and progress beside it for resuming."""
    editor.network.save(checkpoint, extra={"train_settings": asdict(settings), "step": state.step})
    state_path = checkpoint.with_suffix(".state.pt")
    tmp = state_path.with_suffix(".tmp")
    torch.save({"network": editor.network.state_dict(), "optimizer": optimizer.state_dict(),
                "state": json.dumps(asdict(state))}, tmp)
    tmp.replace(state_path)
