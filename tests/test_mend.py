"""The MEND editor on the tiny model: mechanics that must hold exactly."""
from __future__ import annotations

import random

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from editors.editable import Editable
from editors.mend import MendEditor, gradient_factors
from editors.settings import TrainSettings
from editors.training import meta_loss, train
from editors.types import Correction, LocalityPrompt, apply_delta
from store.models import tiny_tokenizer

FACTS = [
    Correction("a", "The capital of France is", "Rome", target_old="Paris",
               rephrases=("France's capital city is",), locality_prompts=(LocalityPrompt("The capital of Spain is", "Madrid"),)),
    Correction("b", "BBC One, by", "Sega", target_old="BBC",
               rephrases=("BBC One is owned by",), locality_prompts=(LocalityPrompt("BBC Radio, by", "BBC"),)),
    Correction("c", "Danielle Darrieux's mother tongue is", "English", target_old="French",
               rephrases=("Danielle Darrieux speaks",), locality_prompts=(LocalityPrompt("Jean Gabin speaks", "French"),)),
]


def test_identity_editor_update_is_the_scaled_raw_gradient(tiny: Editable) -> None:
    editor = MendEditor.fresh(tiny, edit_lr=1e-3)
    delta = editor.propose(tiny, FACTS[:1])
    raw = gradient_factors(tiny, FACTS[:1])
    for name, (u, d, _owner) in raw.items():
        assert torch.allclose(delta.tensors()[name], -1e-3 * d.T @ u, atol=1e-9)


def test_identity_editor_returns_its_normalised_input(tiny: Editable) -> None:
    editor = MendEditor.fresh(tiny)
    transform = editor.network.transforms["64x128"]
    transform.train()
    rows_u, rows_d = torch.randn(50, 64) * 3 + 1, torch.randn(50, 128) * 1e-4
    transform(rows_u, rows_d, 0)  # gathers statistics
    transform.eval()
    out_u, out_d = transform(rows_u, rows_d, 0)
    assert torch.allclose(out_u, transform.norm_u(rows_u)) and torch.allclose(out_d, transform.norm_delta(rows_d))
    assert out_u.mean().abs() < 1e-4 and (out_u.std(0) - 1).abs().max() < 1e-3


def test_delta_touches_only_the_editable_tensors(tiny: Editable) -> None:
    delta = MendEditor.fresh(tiny).propose(tiny, FACTS)
    assert set(delta.tensors()) == set(tiny.edit_names)
    assert all(name.startswith("model.layers.") and ".mlp." in name for name in delta.tensors())


def test_batch_delta_equals_the_sum_of_single_deltas(tiny: Editable) -> None:
    editor = MendEditor.fresh(tiny, edit_lr=1e-2)
    together = editor.propose(tiny, FACTS).tensors()
    singles = [editor.propose(tiny, [fact]).tensors() for fact in FACTS]
    for name, tensor in together.items():
        assert torch.allclose(tensor, sum(single[name] for single in singles), atol=1e-7)


def test_propose_never_changes_the_model(tiny: Editable) -> None:
    before = {n: p.clone() for n, p in tiny.model.named_parameters()}
    MendEditor.fresh(tiny, edit_lr=1e-2).propose(tiny, FACTS)
    assert all(torch.equal(before[n], p) for n, p in tiny.model.named_parameters())


def test_applying_a_delta_and_its_negation_restores_the_weights(tiny: Editable) -> None:
    before = {n: p.clone() for n, p in tiny.model.named_parameters()}
    delta = MendEditor.fresh(tiny, edit_lr=1e-1).propose(tiny, FACTS)
    apply_delta(tiny.model, delta)
    assert not torch.equal(before[tiny.edit_names[0]], dict(tiny.model.named_parameters())[tiny.edit_names[0]])
    apply_delta(tiny.model, delta, sign=-1)
    for name, param in tiny.model.named_parameters():
        assert torch.allclose(param, before[name], atol=1e-6, rtol=0), name


def test_one_correction_subtracts_exactly_from_a_batch(tiny: Editable) -> None:
    editor = MendEditor.fresh(tiny, edit_lr=1e-2)
    batch = editor.propose(tiny, FACTS)
    rest = editor.propose(tiny, [FACTS[0], FACTS[2]]).tensors()
    for name, tensor in batch.without("b").tensors().items():
        assert torch.allclose(tensor, rest[name], atol=1e-7)


def test_a_few_training_steps_lower_the_edit_loss(tiny: Editable) -> None:
    torch.manual_seed(0)
    editor = MendEditor.fresh(tiny, edit_lr=1e-3)
    settings = TrainSettings(edits_per_step=3, lr=1e-3, lr_lr=5e-2, rank=16)
    rng = random.Random(0)

    def edit_loss() -> float:
        editor.network.eval()
        _, losses = meta_loss(tiny, editor, FACTS, rng.sample(FACTS, 3), settings)
        return losses.edit

    before = edit_loss()
    optimizer = torch.optim.Adam(editor.network.parameters(), lr=1e-2)
    editor.network.train()
    for _ in range(30):
        loss, _ = meta_loss(tiny, editor, FACTS, rng.sample(FACTS, 3), settings)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert edit_loss() < 0.8 * before


def test_training_through_the_projection_scores_the_projected_update(tiny: Editable) -> None:
    editor = MendEditor.fresh(tiny, edit_lr=1e-2)
    settings = TrainSettings(edits_per_step=3, rank=16)
    unrelated = FACTS[1:] + FACTS[:1]
    _, free = meta_loss(tiny, editor, FACTS, unrelated, settings)
    nothing_passes = {t.name: torch.zeros(t.in_features, t.in_features) for t in tiny.anatomy.editable}
    _, blocked = meta_loss(tiny, editor, FACTS, unrelated, settings, projectors=nothing_passes)
    everything_passes = {t.name: torch.eye(t.in_features) for t in tiny.anatomy.editable}
    _, open_ = meta_loss(tiny, editor, FACTS, unrelated, settings, projectors=everything_passes)
    assert free.loc > 0 and blocked.loc == 0  # a projector that keeps nothing leaves the model as it was
    assert blocked.edit > free.edit
    assert open_.edit == pytest.approx(free.edit, rel=1e-5) and open_.loc == pytest.approx(free.loc, rel=1e-4)


def test_training_resumes_from_its_checkpoint(tiny: Editable, tmp_path) -> None:
    checkpoint = tmp_path / "editor.safetensors"
    settings = TrainSettings(steps=4, edits_per_step=2, rank=8, checkpoint_every=2)
    first = train(tiny, MendEditor.fresh(tiny, rank=8), FACTS, settings, checkpoint)
    resumed = train(tiny, MendEditor.fresh(tiny, rank=8), FACTS, TrainSettings(**{**settings.__dict__, "steps": 6}), checkpoint)
    assert first.step == 4 and resumed.step == 6
    assert [row["step"] for row in resumed.history] == [1, 2, 3, 4, 5, 6]


def test_saved_editor_loads_with_the_same_behaviour(tiny: Editable, tmp_path) -> None:
    editor = MendEditor.fresh(tiny, rank=8, edit_lr=1e-2)
    editor.network.log_edit_lrs.data += 0.5
    editor.network.save(tmp_path / "e.safetensors")
    again = MendEditor.load(tmp_path / "e.safetensors", tiny)
    a, b = editor.propose(tiny, FACTS).tensors(), again.propose(tiny, FACTS).tensors()
    assert all(torch.allclose(a[n], b[n]) for n in a)


def test_gpt2_conv1d_weights_are_edited_in_their_own_orientation() -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=257, n_embd=32, n_layer=3, n_head=2, n_positions=64)).eval()
    model.requires_grad_(False)
    editable = Editable(model, tiny_tokenizer())
    params = dict(model.named_parameters())
    delta = MendEditor.fresh(editable, edit_lr=1e-2).propose(editable, FACTS[:2])
    for name, tensor in delta.tensors().items():
        assert tensor.shape == params[name].shape
    raw = gradient_factors(editable, FACTS[:1])
    single = MendEditor.fresh(editable, edit_lr=1e-2).propose(editable, FACTS[:1]).tensors()
    name = editable.edit_names[0]
    u, d, _ = raw[name]
    assert torch.allclose(single[name], -1e-2 * (d.T @ u).T, atol=1e-9)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_suffix_from_cached_prefix_equals_the_full_forward(tiny: Editable, arch: str) -> None:
    if arch == "gpt2":
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=257, n_embd=32, n_layer=3, n_head=2, n_positions=64)).eval()
        editable = Editable(model, tiny_tokenizer())
    else:
        editable = tiny
    batch = editable.batch([("The capital of France is", " Paris"), ("Hi", " there")])
    full = editable.model(input_ids=batch.input_ids).logits
    suffix = editable.anatomy(editable.prefix_states(batch))
    real = batch.real_positions | batch.answer_positions
    assert torch.allclose(full[real], suffix[real], atol=1e-5)


def test_cached_bytes_counts_the_kept_prefix_states_and_clearing_frees_them(tiny: Editable) -> None:
    editable = Editable(tiny.model, tiny.tokenizer)
    assert editable.cached_bytes() == 0
    batch = editable.batch([("The capital of France is", " Paris"), ("Hi", " there")])
    editable.prefix_states(batch)
    assert editable.cached_bytes() == int(batch.lengths.sum()) * editable.hidden_size * 4
    editable.clear_cache()
    assert editable.cached_bytes() == 0


@pytest.mark.slow
def test_shipped_editor_makes_a_val_target_the_argmax_and_leaves_an_unrelated_prompt(smollm2: Editable, data_root) -> None:
    from editors.formats import load_corrections
    from editors.registry import make_editor

    [record], _ = load_corrections(data_root / "counterfact" / "val.json", limit=1)
    editor = make_editor("mend", smollm2, "smollm2-135m")
    delta = editor.propose(smollm2, [record])
    edited = {n: w + delta.tensors()[n] for n, w in smollm2.weights().items()}

    target = smollm2.batch([(record.prompt, record.target_new)])
    assert torch.equal(smollm2.logits(target, edited).argmax(-1), target.answer_labels)
    unrelated = smollm2.batch([("The capital of France is", " Paris")])
    assert torch.equal(smollm2.logits(unrelated, edited).argmax(-1), smollm2.logits(unrelated).argmax(-1))


@pytest.mark.slow
@pytest.mark.parametrize("chat_questions", [True, False])
def test_a_question_edited_for_chat_too_is_answered_with_its_target_in_a_chat(smollm2: Editable, data_root,
                                                                               chat_questions: bool) -> None:
    from editors.batching import chat_prompt
    from editors.formats import load_corrections
    from editors.registry import make_editor

    [question], _ = load_corrections(data_root / "zsre" / "zsre_mend-1k.json", limit=1)
    editor = make_editor("mend", smollm2, "smollm2-135m", step_scale=1.6, chat_questions=chat_questions)
    delta = editor.propose(smollm2, [question])
    edited = {n: w + delta.tensors()[n] for n, w in smollm2.weights().items()}

    chat = smollm2.batch([(chat_prompt(smollm2.tokenizer, question.prompt), question.target_new)])
    answered = torch.equal(smollm2.logits(chat, edited).argmax(-1), chat.answer_labels)
    assert answered == chat_questions  # the plain question's edit alone does not reach the chat answer
    plain = smollm2.batch([(question.prompt, question.target_new)])
    assert torch.equal(smollm2.logits(plain, edited).argmax(-1), plain.answer_labels)


@pytest.mark.slow
def test_only_questions_are_edited_in_their_chat_form_too(smollm2: Editable) -> None:
    from editors.mend import edit_pairs

    asked = Correction("q", "Which team does Gabriel Landeskog play for?", "Colorado Avalanche")
    stated = Correction("s", "Gabriel Landeskog plays for", "Colorado Avalanche")
    pairs, owners = edit_pairs(smollm2, [asked, stated], chat_questions=True)
    assert owners == [0, 1, 0]
    assert pairs[2][0].endswith("assistant\n") and asked.prompt in pairs[2][0]
    assert edit_pairs(smollm2, [asked, stated])[1] == [0, 1]


@pytest.mark.slow
def test_a_correction_share_on_the_real_model_is_far_smaller_than_dense(smollm2: Editable, data_root) -> None:
    from editors.formats import load_corrections

    [record], _ = load_corrections(data_root / "counterfact" / "val.json", limit=1)
    share = MendEditor.fresh(smollm2).propose(smollm2, [record]).shares[0]
    low_rank = sum(update.nbytes() for update in share.low_rank.values())
    dense = sum(t.numel() * 4 for t in share.tensors().values())
    assert low_rank < dense / 20


def test_export_folds_the_step_scale_into_a_float16_editor(tiny: Editable, tmp_path) -> None:
    editor = MendEditor.fresh(tiny, rank=8, edit_lr=1e-2)
    scaled = MendEditor(editor.network, step_scale=1.5)
    scaled.export(tmp_path / "shipped.safetensors")
    shipped = MendEditor.load(tmp_path / "shipped.safetensors", tiny)
    a, b = scaled.propose(tiny, FACTS).tensors(), shipped.propose(tiny, FACTS).tensors()
    assert all(torch.allclose(a[n], b[n], rtol=1e-2, atol=1e-6) for n in a)  # float16 weights, float32 steps
    editor.network.save(tmp_path / "full.safetensors")
    assert (tmp_path / "shipped.safetensors").stat().st_size < 0.6 * (tmp_path / "full.safetensors").stat().st_size
