"""The home's regression suites on disk: pinned at init, extended by the operator, read by the gate."""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import editors.anatomy
import editors.editable
import editors.projection
import editors.routing
import policies.probes
import policies.suites
from daemon.home import Home
from editors.editable import Editable
from editors.projection import key_covariance, preserved_batches
from editors.routing import Reference, reference
from policies.probes import DataNotFound, data_dir, preserved_text, unrelated_prompts
from policies.suites import Suites, pin, references
from store.checkpoint import read_tensor_file_with_metadata, write_tensor_file
from store.models import cache_root

log = logging.getLogger(__name__)


class SuitesError(Exception):
    """The suites cannot be read or extended; the message says why and what to do."""


def pin_suites(home: Home, editable: Editable, model: str, version: str, root: Path | None = None,
               routing_layer: int | None = None) -> Suites:
    """Pin the default suites from the model as it is now (the base) and write them to the home;
    with `routing_layer`, the routed memory's reference at that block too."""
    try:
        root = root or data_dir()
    except DataNotFound as error:
        raise SuitesError(f"cannot pin the regression suites: {error}. They are built from ROME's known "
                          "facts, zsRE's questions and WikiText-2 (see policies/data/README.md).") from None
    pinned = [home.suites_path, home.keys_path] + ([home.routing_path] if routing_layer is not None else [])
    cached = cache_root() / "suites" / pinning_key(editable, model, version, root, routing_layer)
    if cached.is_dir():
        copy_files([cached / p.name for p in pinned], pinned)
        return load_suites(home)
    suites = pin(editable, model, version, root)
    write_suites(home, suites)
    pin_keys(home, editable, root)
    if routing_layer is not None:
        pin_routing(home, editable, root, routing_layer)
    keep_in_cache(pinned, cached)
    return suites


# Pinning runs the model over thousands of prompts (minutes for SmolLM2). What it pins depends only
# on the weights, the tokenizer, the data, the code that pins and the arguments, so it is kept in the
# machine's model cache under their hash: another home of the same model copies it.
PINNING_MODULES = (policies.suites, policies.probes, editors.projection, editors.routing, editors.editable,
                   editors.anatomy, sys.modules[__name__])
DATA_FILES = ("known/known_1000.json", "zsre/zsre_mend-1k.json", "wikitext2/wiki.test.raw")


def pinning_key(editable: Editable, model: str, version: str, root: Path, routing_layer: int | None) -> str:
    digest = hashlib.sha256(repr((model, version, routing_layer, torch.__version__)).encode())
    for name, tensor in sorted(editable.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    backend = getattr(editable.tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else json.dumps(editable.tokenizer.get_vocab(), sort_keys=True)).encode())
    for name in DATA_FILES:
        digest.update((root / name).read_bytes())
    for module in PINNING_MODULES:
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()[:40]


def copy_files(sources: list[Path], targets: list[Path]) -> None:
    for source, target in zip(sources, targets):
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".tmp")
        shutil.copyfile(source, partial)
        partial.replace(target)


def keep_in_cache(files: list[Path], cached: Path) -> None:
    """Copy the pinned files into the cache; written aside and renamed, so a reader sees all or none.
    A cache that cannot be written (read-only, full) only costs the next home a pin."""
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".pinning-"))
        copy_files(files, [partial / f.name for f in files])
        try:
            partial.rename(cached)
        except OSError:  # another process cached the same pin first
            shutil.rmtree(partial, ignore_errors=True)
    except OSError as error:
        log.warning("pinned suites not cached in %s: %s", cached.parent, error)


def preserved_covariance(editable: Editable, root: Path) -> dict[str, torch.Tensor]:
    pairs, chunks = preserved_text(root, editable.tokenizer)
    return key_covariance(editable, preserved_batches(editable, pairs, chunks))


def pin_keys(home: Home, editable: Editable, root: Path) -> None:
    """The preserved keys' covariance at each edited tensor, from the base model, for the projection."""
    covariance = {name: c.float().contiguous() for name, c in preserved_covariance(editable, root).items()}
    home.keys_path.parent.mkdir(parents=True, exist_ok=True)
    partial = home.keys_path.with_suffix(".tmp")
    save_file(covariance, str(partial))
    partial.replace(home.keys_path)


def load_keys(home: Home) -> dict[str, torch.Tensor]:
    if not home.keys_path.exists():
        raise SuitesError(f"no preserved-key statistics at {home.keys_path} (editor.projection is on): pin them with "
                          f"`mendd --home {home.root} suites pin`, or set editor.projection: false")
    return load_file(str(home.keys_path))


def routing_reference(home: Home, editable: Editable, layer: int) -> Reference:
    """The routed memory's reference at `layer`: as pinned in the home, or pinned now (from the
    editing data) when it is missing, was pinned at another block, or lacks the prompts' lengths."""
    if home.routing_path.exists():
        tensors, metadata = read_tensor_file_with_metadata(home.routing_path)
        if int(metadata["layer"]) == layer:
            if "lengths" in tensors:  # pinned before leads: pinned again below
                return Reference(layer, tensors["centre"], tensors["unit_states"], tensors["lengths"], int(metadata["prompts"]))
    try:
        root = data_dir()
    except DataNotFound as error:
        raise SuitesError(f"cannot pin the routed memory's reference states: {error}") from None
    return pin_routing(home, editable, root, layer)


def pin_routing(home: Home, editable: Editable, root: Path, layer: int) -> Reference:
    """Pin the routed memory's reference: held-out unrelated prompts' states at `layer` (the
    training halves of zsRE's questions and WikiText-2's sentences, never a gate suite's) with the
    model as it is now (the base: routed versions never change the weights)."""
    prompts = [p.prompt for p in unrelated_prompts(root, n_questions=300, n_sentences=300, half=1)]
    ref = reference(editable, prompts, layer)
    home.routing_path.parent.mkdir(parents=True, exist_ok=True)
    write_tensor_file(home.routing_path, {"centre": ref.centre.contiguous(), "unit_states": ref.unit_states.contiguous(),
                                            "lengths": ref.lengths.contiguous()},
                      metadata={"layer": str(layer), "prompts": str(ref.prompts)})
    return ref


def write_suites(home: Home, suites: Suites) -> None:
    home.suites_path.parent.mkdir(parents=True, exist_ok=True)
    partial = home.suites_path.with_suffix(".tmp")
    partial.write_text(suites.to_json(), encoding="utf-8")
    partial.replace(home.suites_path)


def load_suites(home: Home) -> Suites:
    if not home.suites_path.exists():
        raise SuitesError(f"no regression suites at {home.suites_path}: pin them with `mendd --home {home.root} suites pin`")
    return Suites.from_json(home.suites_path.read_text(encoding="utf-8"))


def read_locality_file(path: Path) -> list[tuple[str, str]]:
    """(prompt, answer) pairs from JSONL lines {"prompt": ..., "answer": ...}; errors name the line and field."""
    pairs = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise SuitesError(f"cannot read {path}: {error}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise SuitesError(f"{path} line {number}: not JSON ({error.msg}); nothing was added") from None
        for field in ("prompt", "answer"):
            value = record.get(field) if isinstance(record, dict) else None
            if not isinstance(value, str) or not value.strip():
                raise SuitesError(f"{path} line {number}, field {field!r}: must be a non-empty string; nothing was added")
        pairs.append((record["prompt"], record["answer"]))
    return pairs


def extend_suites(home: Home, editable: Editable, path: Path) -> tuple[Suites, int]:
    """Add an operator's locality prompts; their reference is the model passed in (the served one)."""
    suites = load_suites(home)
    grown = suites.extended(references(editable, read_locality_file(path), "operator"))
    write_suites(home, grown)
    return grown, len(grown.locality) - len(suites.locality)
