"""Pick an editor by name: `mend` (the shipped pretrained network unless a path is given), `ft`, `none`."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from editors.editable import Editable
from editors.finetune import FineTuneEditor, NoEditor
from editors.memory_model import RelationReader, reader_from
from editors.mend import PRETRAINED_DIR, MendEditor
from editors.types import Correction, Delta

EDITORS = ("mend", "ft", "none")


class EditorNotFound(FileNotFoundError):
    """No trained editor where one was asked for; the message says how to get one."""


class Editor(Protocol):
    name: str

    def propose(self, editable: Editable, corrections: list[Correction]) -> Delta: ...


def pretrained_path(model_spec: str) -> Path:
    return PRETRAINED_DIR / f"{model_spec}.safetensors"


def relation_reader_path(model_spec: str) -> Path:
    return PRETRAINED_DIR / f"{model_spec}.relations.safetensors"


def relation_reader(model_spec: str, floor: float | None = None) -> RelationReader | None:
    """The relation reader shipped for `model_spec` (bench/relation_reader.py), at `floor` (None: the
    floor it was tuned at); None where none is shipped, or with floor 0 (no check)."""
    path = relation_reader_path(model_spec)
    if floor == 0 or not path.exists():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        tuned = float(handle.metadata()["floor"])
    return reader_from(tensors, tuned if floor is None else floor)


def make_editor(name: str, editable: Editable, model_spec: str, path: Path | None = None,
                step_scale: float = 1.0, chat_questions: bool = False) -> Editor:
    if name == "ft":
        return FineTuneEditor()
    if name == "none":
        return NoEditor()
    if name != "mend":
        raise ValueError(f"unknown editor {name!r}: choose one of {', '.join(EDITORS)}")
    path = path or pretrained_path(model_spec)
    if not path.exists():
        raise EditorNotFound(
            f"no MEND editor for model {model_spec!r} at {path}: train one with "
            f"`mendd train-editor --out {path}` or choose --editor ft"
        )
    return MendEditor.load(path, editable, step_scale, chat_questions)


def guarded(editor: Editor, editable: Editable, preserved: dict | None, projection_threshold: float | None,
            aggregation_strength: float | None) -> Editor:
    """The editor as the service runs it: a batch's low-rank updates aggregated by least squares
    (with strength λ), and every update kept out of the preserved keys' main directions (projection
    threshold), each when asked for; last, its factors rounded for storage. `preserved`: K0 K0ᵀ per
    tensor, needed by either."""
    from editors.aggregation import LeastSquaresEditor
    from editors.projection import null_space_projectors, projected

    if aggregation_strength is not None and isinstance(editor, MendEditor):
        projectors = null_space_projectors(preserved, projection_threshold) if projection_threshold is not None else None
        editor = LeastSquaresEditor(editor, preserved, aggregation_strength, projectors)
    elif projection_threshold is not None:
        editor = projected(editor, editable, preserved, projection_threshold)
    return StorageRounded(editor)


class StorageRounded:
    """Low-rank factors rounded to bfloat16 values as they leave the editor, so the store keeps them
    exactly in half the bytes: the gate judges, the store commits and `mendd revert` subtracts the
    same numbers. Rounding moves each factor by at most 2⁻⁹ of itself."""

    def __init__(self, inner: Editor):
        self.inner = inner
        self.name = inner.name

    def propose(self, editable: Editable, corrections: list[Correction]) -> Delta:
        return self.inner.propose(editable, corrections).rounded(torch.bfloat16)
