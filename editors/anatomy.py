"""Where the editable tensors sit in a causal LM, and how to run only the part after them.

Everything before the first edited layer is the same in every version of the model, so its output
(the hidden states entering that layer) is computed once and cached; edits, training and gates then
run only the edited layers and the head. Sequences are right-padded and attention is causal, so a
real token never sees padding and its hidden state does not depend on what it is batched with.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from editors.memory_model import adding


class _StopForward(Exception):
    pass


@dataclass(frozen=True)
class EditableTensor:
    name: str  # the parameter's name in the model, e.g. model.layers.27.mlp.up_proj.weight
    module: nn.Module
    in_features: int
    out_features: int
    transposed: bool  # GPT-2 Conv1D stores its weight as [in, out]


def default_edit_modules(model: nn.Module, last_n: int = 3) -> list[str]:
    """The MLP weights of the last `last_n` blocks, for Llama-style and GPT-2-style models."""
    blocks, _, _, _ = _parts(model)
    prefix = _blocks_prefix(model)
    names = []
    for index in range(len(blocks) - last_n, len(blocks)):
        mlp = blocks[index].mlp
        for child_name, child in mlp.named_children():
            if _is_linear_like(child):
                names.append(f"{prefix}.{index}.mlp.{child_name}.weight")
    return names


class Anatomy(nn.Module):
    """The suffix of a model (edited blocks, final norm, head) as its own module.

    Parameter names inside the suffix differ from the model's; `to_suffix` maps them, so that
    `torch.func.functional_call` can run the suffix with candidate weights without touching the model.
    """

    def __init__(self, model: nn.Module, edit_names: list[str]):
        super().__init__()
        blocks, norm, head, rotary = _parts(model)
        modules = dict(model.named_modules())
        params = dict(model.named_parameters())
        prefix = _blocks_prefix(model)
        missing = [n for n in edit_names if n not in params]
        if missing:
            raise ValueError(f"editable tensors not in the model: {missing}")
        self.first = min(int(n[len(prefix) + 1 :].split(".")[0]) for n in edit_names)
        self.blocks = nn.ModuleList(list(blocks)[self.first :])
        self.norm = norm
        self.head = head
        self.rotary = rotary
        self.model = [model]  # a list keeps it out of this module's parameters
        self._prefix = prefix
        self.editable = []
        for name in edit_names:
            module = modules[name.rsplit(".", 1)[0]]
            weight = params[name]
            transposed = not isinstance(module, nn.Linear)
            in_f, out_f = (weight.shape[0], weight.shape[1]) if transposed else (weight.shape[1], weight.shape[0])
            self.editable.append(EditableTensor(name, module, in_f, out_f, transposed))

    def to_suffix(self, name: str) -> str:
        rest = name[len(self._prefix) + 1 :]
        index, tail = rest.split(".", 1)
        return f"blocks.{int(index) - self.first}.{tail}"

    @torch.no_grad()
    def states_entering(self, input_ids: torch.Tensor, block: int) -> torch.Tensor:
        """Hidden states entering `block` (the first edited one: the prefix states), [batch, seq, hidden]."""
        captured: list[torch.Tensor] = []

        def grab(_module, args, kwargs):
            captured.append(args[0] if args else kwargs["hidden_states"])
            raise _StopForward

        model = self.model[0]
        blocks, _, _, _ = _parts(model)
        handle = blocks[block].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            model(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured[0].detach()

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from prefix states; only at `positions` (a bool mask [batch, seq]) when given."""
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        kwargs = {}
        if self.rotary is not None:
            kwargs = {"position_embeddings": self.rotary(hidden, position_ids), "position_ids": position_ids}
        for block in self.blocks:
            hidden = block(hidden, attention_mask=None, **kwargs)
        hidden = self.norm(hidden)
        if positions is not None:
            hidden = hidden[positions]
        return self.head(hidden)

    def run(self, hidden: torch.Tensor, positions: torch.Tensor | None = None,
            weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The suffix with some editable tensors replaced (model names -> tensors)."""
        if not weights:
            return self(hidden, positions)
        renamed = {self.to_suffix(name): tensor for name, tensor in weights.items()}
        return functional_call(self, renamed, (hidden, positions), strict=False)

    def run_per_row(self, hidden: torch.Tensor, positions: torch.Tensor | None,
                    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                    weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The suffix (with `weights` as `run` takes them) plus a low-rank change of its own for each
        row: per tensor name, inputs [batch, rank, in] and outputs [batch, rank, out], so row b's ΔW
        is outputs[b]ᵀ inputs[b]."""
        with self.adding(factors):
            return self.run(hidden, positions, weights)

    def adding(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        """While inside, each named tensor's module adds its row's low-rank change to its output
        (inputs [batch, rank, in], outputs [batch, rank, out]), in this suffix or the whole model."""
        return adding({e.name: e.module for e in self.editable}, factors)

    def current_weights(self) -> dict[str, torch.Tensor]:
        params = dict(self.model[0].named_parameters())
        return {e.name: params[e.name] for e in self.editable}


def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _blocks_prefix(model: nn.Module) -> str:
    if hasattr(model, "model") and hasattr(model.model, "layers"):
        return "model.layers"
    if hasattr(model, "transformer") and hasattr(model.transformer, "h"):
        return "transformer.h"
    raise ValueError(f"unsupported architecture {type(model).__name__}: expected Llama-style or GPT-2-style blocks")


def _parts(model: nn.Module):
    """(blocks, final norm, head, rotary embedding or None) for the supported families."""
    if _blocks_prefix(model) == "model.layers":
        inner = model.model
        return inner.layers, inner.norm, model.lm_head, getattr(inner, "rotary_emb", None)
    inner = model.transformer
    return inner.h, inner.ln_f, model.lm_head, None
