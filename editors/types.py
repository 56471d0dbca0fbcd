"""The records that flow through editing: a Correction in, a Delta out."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import torch


class EditInputError(ValueError):
    """A correction that cannot be edited; names the record and the field."""

    def __init__(self, correction_id: str, field_name: str, problem: str):
        super().__init__(f"correction {correction_id!r}, field {field_name!r}: {problem}")
        self.correction_id = correction_id
        self.field_name = field_name
        self.problem = problem


@dataclass(frozen=True)
class LocalityPrompt:
    """An unrelated prompt and the answer the model gives it; an edit must leave it alone."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class Correction:
    id: str
    prompt: str
    target_new: str
    subject: str | None = None
    target_old: str | None = None
    rephrases: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()  # other names of the subject: a query naming one is served too
    locality_prompts: tuple[LocalityPrompt, ...] = ()
    source: str = "manual"
    received_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    def validate(self) -> None:
        """Raise EditInputError for the first field that cannot be edited."""
        for name in ("id", "prompt", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise EditInputError(str(self.id), name, f"must be a string, got {type(value).__name__}")
        if not self.prompt.strip():
            raise EditInputError(self.id, "prompt", "is empty or whitespace")
        if not self.target_new.strip():
            raise EditInputError(self.id, "target_new", "is empty or whitespace")
        for name in ("subject", "target_old"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise EditInputError(self.id, name, f"must be a string or absent, got {type(value).__name__}")
        for field_name in ("rephrases", "aliases"):
            for i, text in enumerate(getattr(self, field_name)):
                if not isinstance(text, str) or not text.strip():
                    raise EditInputError(self.id, f"{field_name}[{i}]", "must be a non-empty string")


@dataclass(frozen=True)
class LowRankUpdate:
    """ΔW = scale · Σ_k outer(out_k, in_k) for one tensor; kept factored so it can be subtracted exactly.

    `outputs` is [k, out_features] and `inputs` is [k, in_features]; for a GPT-2 Conv1D weight,
    stored [in, out], `transposed` says so.
    """

    inputs: torch.Tensor
    outputs: torch.Tensor
    scale: float
    transposed: bool = False

    def dense(self) -> torch.Tensor:
        return stacked_dense([self])

    def nbytes(self) -> int:
        return self.inputs.nbytes + self.outputs.nbytes

    def rounded(self, dtype: torch.dtype) -> "LowRankUpdate":
        """The same update with its factors rounded to values `dtype` holds exactly (their type unchanged)."""
        return replace(self, inputs=self.inputs.to(dtype).to(self.inputs.dtype), outputs=self.outputs.to(dtype).to(self.outputs.dtype))


def stacked_dense(updates: list[LowRankUpdate]) -> torch.Tensor:
    """Σ of several low-rank updates of one tensor as a single matrix product of stacked factors."""
    outputs = torch.cat([u.outputs * u.scale for u in updates])
    inputs = torch.cat([u.inputs for u in updates])
    update = outputs.T @ inputs
    return update.T if updates[0].transposed else update


@dataclass(frozen=True)
class Share:
    """The part of a Delta that some corrections brought: low-rank (MEND) or dense (fine-tuning).

    A MEND share carries one correction; a fine-tuning share carries its whole batch, since the
    steps of a batch cannot be separated.
    """

    correction_ids: tuple[str, ...]
    low_rank: dict[str, LowRankUpdate] = field(default_factory=dict)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {name: update.dense() for name, update in self.low_rank.items()}
        for name, tensor in self.dense.items():
            out[name] = out[name] + tensor if name in out else tensor
        return out


@dataclass
class Delta:
    """An additive weight change: tensor name -> ΔW, as the sum of its shares.

    `holding` are corrections the model already satisfied (no change needed); `invalid` are
    corrections that could not be edited, each with its EditInputError.
    """

    editor: str
    shares: list[Share] = field(default_factory=list)
    holding: list[str] = field(default_factory=list)
    invalid: list[EditInputError] = field(default_factory=list)

    @property
    def correction_ids(self) -> list[str]:
        return [cid for share in self.shares for cid in share.correction_ids]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Name -> ΔW; the low-rank shares of each tensor are stacked into one product (fast for big batches)."""
        low_rank: dict[str, list[LowRankUpdate]] = {}
        total: dict[str, torch.Tensor] = {}
        for share in self.shares:
            for name, update in share.low_rank.items():
                low_rank.setdefault(name, []).append(update)
            for name, tensor in share.dense.items():
                total[name] = total[name] + tensor if name in total else tensor
        for name, updates in low_rank.items():
            dense = stacked_dense(updates)
            total[name] = total[name] + dense if name in total else dense
        return total

    def rounded(self, dtype: torch.dtype) -> "Delta":
        """Every low-rank factor rounded to values `dtype` holds exactly; dense shares unchanged."""
        shares = [Share(s.correction_ids, low_rank={n: u.rounded(dtype) for n, u in s.low_rank.items()}, dense=s.dense)
                  for s in self.shares]
        return Delta(editor=self.editor, shares=shares, holding=list(self.holding), invalid=list(self.invalid))

    def without(self, correction_id: str) -> "Delta":
        """This delta minus the share that carries `correction_id` (exact for low-rank shares)."""
        kept = [share for share in self.shares if correction_id not in share.correction_ids]
        return Delta(editor=self.editor, shares=kept, holding=list(self.holding), invalid=list(self.invalid))


def apply_delta(model: torch.nn.Module, delta: Delta, sign: float = 1.0) -> None:
    """Add (sign=+1) or remove (sign=-1) a delta in place; the one step that mutates weights."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in delta.tensors().items():
            params[name].add_(tensor.to(params[name].dtype), alpha=sign)
