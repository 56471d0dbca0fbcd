"""MEND: an editor network that turns one gradient pass into a weight change (Mitchell et al., 2022).

For a linear layer, the gradient of the weight for one token is the outer product of the layer's
output gradient δ and its input u. An MLP g maps each token's (u, δ) to (ũ, δ̃); the update is
ΔW = -α_l Σ_t δ̃_t ũ_tᵀ with a learned step α_l per layer. g is shared between the layers of one
shape, with a per-layer scale and offset; it starts as the identity, and its inputs are normalised
by running statistics gathered during training.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from editors.admission import admissible
from editors.batching import chat_prompt
from editors.editable import Editable
from editors.memory_model import is_question
from editors.settings import TrainSettings
from editors.types import Correction, Delta, LowRankUpdate, Share
from editors import scoring

PRETRAINED_DIR = Path(__file__).parent / "pretrained"


@dataclass(frozen=True)
class MendSettings:
    rank: int = TrainSettings.rank
    edit_lr: float = TrainSettings.edit_lr  # initial α_l
    edit_names: tuple[str, ...] = ()
    model_spec: str = ""


class RunningNorm(nn.Module):
    """Mean and standard deviation of every input row seen in training (Welford, batched)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("m2", torch.zeros(dim))

    @torch.no_grad()
    def update(self, rows: torch.Tensor) -> None:
        n = rows.shape[0]
        if n == 0:
            return
        batch_mean = rows.mean(0)
        batch_m2 = ((rows - batch_mean) ** 2).sum(0)
        total = self.count + n
        shift = batch_mean - self.mean
        self.mean += shift * n / total
        self.m2 += batch_m2 + shift**2 * self.count * n / total
        self.count.fill_(total)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        if self.count < 2:  # no statistics yet: pass through, so a fresh editor is plain gradient descent
            return rows
        std = (self.m2 / (self.count - 1)).sqrt()
        return (rows - self.mean) / (std + 1e-7)


class LowRankResidual(nn.Module):
    """z + act(s_l ⊙ (U V z + b) + o_l): low rank, per-layer scale s_l and offset o_l, U = 0 at init."""

    def __init__(self, dim: int, rank: int, n_modes: int, relu: bool):
        super().__init__()
        self.v = nn.Parameter(torch.empty(rank, dim))
        nn.init.kaiming_uniform_(self.v, a=math.sqrt(5))
        self.u = nn.Parameter(torch.zeros(dim, rank))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.ones(n_modes, dim))
        self.offset = nn.Parameter(torch.zeros(n_modes, dim))
        self.relu = relu

    def forward(self, z: torch.Tensor, mode: int) -> torch.Tensor:
        pre = self.scale[mode] * ((z @ self.v.T) @ self.u.T + self.bias) + self.offset[mode]
        return z + (torch.relu(pre) if self.relu else pre)


class GradientTransform(nn.Module):
    """g for one weight shape: (u, δ) rows -> (ũ, δ̃) rows, for each layer (mode) of that shape."""

    def __init__(self, in_features: int, out_features: int, rank: int, n_modes: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.norm_u = RunningNorm(in_features)
        self.norm_delta = RunningNorm(out_features)
        dim = in_features + out_features
        # one low-rank hidden layer with ReLU, then a linear low-rank layer; both residual
        self.hidden = LowRankResidual(dim, rank, n_modes, relu=True)
        self.output = LowRankResidual(dim, rank, n_modes, relu=False)

    def forward(self, u: torch.Tensor, delta: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training:
            self.norm_u.update(u)
            self.norm_delta.update(delta)
        z = torch.cat([self.norm_u(u), self.norm_delta(delta)], -1)
        z = self.output(self.hidden(z, mode), mode)
        return z[:, : self.in_features], z[:, self.in_features :]


def shape_key(in_features: int, out_features: int) -> str:
    return f"{in_features}x{out_features}"


class MendNetwork(nn.Module):
    """All the editor's learned parts: one GradientTransform per shape and one step size per tensor."""

    def __init__(self, shapes: list[tuple[int, int]], settings: MendSettings):
        super().__init__()
        self.settings = settings
        self.modes: list[tuple[str, int]] = []  # per editable tensor: (shape key, mode index)
        counts: dict[str, int] = {}
        for in_f, out_f in shapes:
            key = shape_key(in_f, out_f)
            self.modes.append((key, counts.get(key, 0)))
            counts[key] = counts.get(key, 0) + 1
        dims = {shape_key(i, o): (i, o) for i, o in shapes}
        self.transforms = nn.ModuleDict(
            {key: GradientTransform(*dims[key], settings.rank, n) for key, n in counts.items()}
        )
        self.log_edit_lrs = nn.Parameter(torch.full((len(shapes),), math.log(settings.edit_lr)))

    def transform(self, index: int, u: torch.Tensor, delta: torch.Tensor):
        key, mode = self.modes[index]
        return self.transforms[key](u, delta, mode)

    def edit_lr(self, index: int) -> torch.Tensor:
        return self.log_edit_lrs[index].exp()

    def save(self, path: Path, extra: dict | None = None, dtype: torch.dtype = torch.float32) -> None:
        # statistics and step sizes stay float32: small, and the edit's scale depends on them exactly
        keep = lambda k: "norm" in k or k == "log_edit_lrs"  # noqa: E731
        tensors = {k: v.detach().to(torch.float32 if keep(k) else dtype).contiguous() for k, v in self.state_dict().items()}
        meta = {"settings": json.dumps(asdict(self.settings)), "extra": json.dumps(extra or {})}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, shapes: list[tuple[int, int]]) -> "MendNetwork":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata()
        raw = json.loads(meta["settings"])
        settings = MendSettings(**{**raw, "edit_names": tuple(raw["edit_names"])})
        state = {k: v.float() for k, v in load_file(str(path)).items()}
        network = cls(shapes, settings)
        network.load_state_dict(state)
        return network


class MendEditor:
    name = "mend"

    def __init__(self, network: MendNetwork, step_scale: float = 1.0, chat_questions: bool = False):
        self.network = network
        self.step_scale = step_scale  # multiplies every learned α_l: trades reliability for locality
        self.chat_questions = chat_questions  # also edit each question as the chat template asks it

    @classmethod
    def fresh(cls, editable: Editable, rank: int = TrainSettings.rank, edit_lr: float = TrainSettings.edit_lr,
              model_spec: str = "") -> "MendEditor":
        settings = MendSettings(rank=rank, edit_lr=edit_lr, edit_names=tuple(editable.edit_names), model_spec=model_spec)
        shapes = [(e.in_features, e.out_features) for e in editable.anatomy.editable]
        return cls(MendNetwork(shapes, settings).eval())

    @classmethod
    def load(cls, path: Path, editable: Editable, step_scale: float = 1.0, chat_questions: bool = False) -> "MendEditor":
        shapes = [(e.in_features, e.out_features) for e in editable.anatomy.editable]
        network = MendNetwork.load(path, shapes)
        if list(network.settings.edit_names) != editable.edit_names:
            raise ValueError(
                f"editor {path} was trained for tensors {list(network.settings.edit_names)}, "
                f"but the model's editable tensors are {editable.edit_names}"
            )
        return cls(network.eval(), step_scale, chat_questions)

    def export(self, path: Path, note: str = "") -> None:
        """The shipping form: the step scale folded into the learned steps, weights in float16."""
        network = self.network
        with torch.no_grad():
            network.log_edit_lrs += math.log(self.step_scale)
        try:
            network.save(path, extra={"step_scale_folded": self.step_scale, "note": note}, dtype=torch.float16)
        finally:
            with torch.no_grad():
                network.log_edit_lrs -= math.log(self.step_scale)

    def propose(self, editable: Editable, corrections: list[Correction]) -> Delta:
        delta = Delta(editor=self.name)
        ready = admissible(editable, corrections, delta)
        if not ready:
            return delta
        with torch.no_grad():
            factors = self.factors(editable, ready, self.chat_questions)
        for correction, per_tensor in zip(ready, factors):
            delta.shares.append(Share(correction_ids=(correction.id,), low_rank=per_tensor))
        return delta

    def factors(self, editable: Editable, corrections: list[Correction], chat_questions: bool = False
                ) -> list[dict[str, LowRankUpdate]]:
        """Each correction's low-rank update per tensor; differentiable in the network's parameters."""
        rows = gradient_factors(editable, corrections, chat_questions)
        out: list[dict[str, LowRankUpdate]] = [dict() for _ in corrections]
        for index, tensor in enumerate(editable.anatomy.editable):
            u, delta, owner = rows[tensor.name]
            u_t, delta_t = self.network.transform(index, u, delta)
            lr = self.network.edit_lr(index) * self.step_scale
            for b in range(len(corrections)):
                mine = owner == b
                out[b][tensor.name] = LowRankUpdate(
                    inputs=u_t[mine], outputs=delta_t[mine], scale=-lr, transposed=tensor.transposed
                )
        return out


def edit_pairs(editable: Editable, corrections: list[Correction], chat_questions: bool = False
               ) -> tuple[list[tuple[str, str]], list[int]]:
    """The (prompt, answer) pairs the edit is computed on and the correction each belongs to: every
    prompt, and with `chat_questions` each question (a prompt ending in "?") also as the model's chat
    template asks it. A chat answer starts after the template's assistant header, a context the
    plain question's edit barely reaches, so a chat model asked the question would answer as before."""
    pairs = [(c.prompt, c.target_new) for c in corrections]
    owners = list(range(len(corrections)))
    if chat_questions and getattr(editable.tokenizer, "chat_template", None):
        for index, correction in enumerate(corrections):
            if is_question(correction.prompt):
                pairs.append((chat_prompt(editable.tokenizer, correction.prompt), correction.target_new))
                owners.append(index)
    return pairs, owners


def gradient_factors(editable: Editable, corrections: list[Correction], chat_questions: bool = False
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One gradient pass: per editable tensor, the (u, δ) rows of every token that carries gradient
    and the index of the correction each row belongs to (`edit_pairs` says which texts are read).

    The loss is the sum over pairs of each one's mean answer NLL, so a correction's δ depends
    on it alone and a batch's update is exactly the sum of single updates.
    """
    pairs, owners = edit_pairs(editable, corrections, chat_questions)
    batch = editable.batch(pairs)
    hidden = editable.prefix_states(batch).requires_grad_(True)
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for tensor in editable.anatomy.editable:
        def capture(_module, args, output, name=tensor.name):
            inputs[name] = args[0].detach()
            outputs[name] = output
        handles.append(tensor.module.register_forward_hook(capture))
    try:
        with torch.enable_grad():
            logits = editable.anatomy(hidden, batch.answer_positions)
            loss = scoring.mean_nll(logits, batch.answer_labels, batch.row_of_answer, len(pairs)).sum()
            names = [t.name for t in editable.anatomy.editable]
            grads = torch.autograd.grad(loss, [outputs[n] for n in names])
    finally:
        for handle in handles:
            handle.remove()
    result = {}
    for name, grad in zip(names, grads):
        carries = grad.abs().sum(-1) > 0  # [batch, seq]: tokens the loss reaches
        owner = torch.tensor(owners)[carries.nonzero()[:, 0]]
        result[name] = (inputs[name][carries], grad[carries], owner)
    return result
