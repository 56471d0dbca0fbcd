"""Per-tensor checkpoints: one safetensors file per tensor, plus config and tokenizer files.

One file per tensor lets DVC deduplicate per file, so a version costs only the tensors it changed.
The folder is also a valid sharded Hugging Face checkpoint (``model.safetensors.index.json`` maps
each tensor to its file), so ``transformers`` loads any version directly.

Files are written under a temporary name and renamed into place, never rewritten: with DVC's cache
in copy mode the workspace file is a copy, but a rename also means a reader (or a crash) only ever
sees a whole old file or a whole new one.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load, save, save_file

SUFFIX = ".safetensors"
COMPRESSED = ".gz"
INDEX = "model.safetensors.index.json"
PARTIAL = ".partial"


def tensor_file(name: str) -> str:
    return name + SUFFIX


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state, each storage once: a tied lm_head shares the embedding, and
    ``transformers`` re-ties it on load, so writing it twice would only waste space."""
    seen: set[tuple[int, torch.device]] = set()
    unique: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.device)
        if key not in seen:
            seen.add(key)
            unique[name] = tensor
    return unique


def write_tensors(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write each tensor to its own file, atomically, and make the renames durable."""
    for name, tensor in tensors.items():
        write_tensor_file(folder / tensor_file(name), {name: tensor})
    fsync_dir(folder)


def write_tensor_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """One safetensors file, written beside its final name and renamed over it; gzip-compressed
    (fastest level) when the name ends in ``.gz``."""
    partial = path.with_name(f".{path.name}{PARTIAL}")
    plain = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    metadata = {"format": "pt", **(metadata or {})}
    if path.name.endswith(COMPRESSED):
        partial.write_bytes(gzip.compress(save(plain, metadata=metadata), compresslevel=1))
    else:
        save_file(plain, str(partial), metadata=metadata)
    with open(partial, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, path)


def read_tensors(folder: Path, names: list[str]) -> dict[str, torch.Tensor]:
    return {name: read_tensor_file(folder / tensor_file(name))[name] for name in names}


def read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    return read_tensor_file_with_metadata(path)[0]


def read_tensor_file_with_metadata(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and metadata, from one read (one decompression for ``.gz``)."""
    if path.name.endswith(COMPRESSED):
        data = gzip.decompress(path.read_bytes())
        # The safetensors layout: an 8-byte little-endian header length, then the JSON header.
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        return load(data), dict(header.get("__metadata__") or {})
    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}, dict(handle.metadata() or {})


def tensor_layout(folder: Path, name: str) -> tuple[tuple[int, ...], str]:
    """Shape and safetensors dtype code (``F32``...) of a stored tensor, read from its header only."""
    with safe_open(str(folder / tensor_file(name)), framework="pt") as handle:
        view = handle.get_slice(name)
        return tuple(view.get_shape()), view.get_dtype()


def dtype_code(tensor: torch.Tensor) -> str:
    """The safetensors dtype code a tensor is written with (``F32`` for float32)."""
    return _DTYPE_CODES.get(tensor.dtype, str(tensor.dtype))


_DTYPE_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def tensor_names(folder: Path) -> list[str]:
    index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
    return list(index["weight_map"])


def remove_partials(folder: Path) -> list[Path]:
    """Delete files a crash left half-written; they were never renamed into place."""
    found = sorted(folder.rglob(f".*{PARTIAL}"))
    for path in found:
        path.unlink()
    return found


def save_model(folder: Path, model, tokenizer) -> None:
    """Write a complete checkpoint to ``folder`` (which must not exist): built beside it, renamed."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        model.config.save_pretrained(building)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(building)
        tokenizer.save_pretrained(building)
        tensors = model_tensors(model)
        write_tensors(building, tensors)
        _write_index(building, tensors)
        building.rename(folder)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    fsync_dir(folder.parent)


def _write_index(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    total = sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": {name: tensor_file(name) for name in tensors}}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` survive a power cut, not only a killed process."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
