"""`mendd export VERSION --out DIR`: a version as a folder that plain transformers loads.

A weights version is its model/ folder as committed: a Hugging Face folder whose weights carry the
corrections. A routed version's weights are the base model's; its corrections live in the memory,
which mendd serves by routing. Its export adds the memory in one file (memory.safetensors) and
editors/memory_model.py, copied verbatim as the folder's modeling file, with config.json naming it
(`auto_map`), so `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` routes and
generates exactly as mendd serves the version.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from daemon.stored_form import entry_from_stored
from editors import memory_model
from editors.routing import Entry
from store.checkpoint import write_tensor_file
from store.versions import MEMORY, VersionStore, read_memory_chunk

MODELING_FILE = "modeling_mendd.py"
ROUTED_CLASS = "MenddRoutedLlamaForCausalLM"


@dataclass(frozen=True)
class Exported:
    version: str
    folder: Path
    routed: bool
    entries: int


class ExportError(Exception):
    pass


def export_version(store: VersionStore, tag: str, out: Path, tau: float, margin: float,
                   reader: memory_model.RelationReader | None = None) -> Exported:
    """Write version `tag` into the new folder `out`; a routed memory is served at `tau` and `margin`
    with `reader` (the home's routing settings, as mendd serves it)."""
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty: export into a new folder")
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        store.copy_model(tag, partial)
        chunks = sorted((partial / MEMORY).glob("v*")) if (partial / MEMORY).exists() else []
        entries = [entry_from_stored(share) for path in chunks for share in read_memory_chunk(path).shares]
        routed = bool(chunks)
        if routed:
            layer = int(read_memory_chunk(chunks[0]).metadata["layer"])
            centre = read_memory_chunk(chunks[0]).common["centre"]
            write_memory(partial / memory_model.MEMORY_FILE, entries, centre, layer, tau, margin, tag, reader)
            shutil.rmtree(partial / MEMORY)
            shutil.copyfile(memory_model.__file__, partial / MODELING_FILE)
            name_routed_class(partial / "config.json")
        if out.exists():
            out.rmdir()
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return Exported(tag, out, routed, len(entries))


def write_memory(path: Path, entries: list[Entry], centre: torch.Tensor, layer: int, tau: float, margin: float,
                 version: str, reader: memory_model.RelationReader | None = None) -> None:
    """The memory as editors/memory_model.StoredMemory reads it: keys, leads, relations, floors and
    the centre stacked, each entry's factors as `i/<tensor>/inputs` and `i/<tensor>/outputs` (times its scale,
    as serving applies them), the relation reader as `reader/<part>` (its floor in the metadata), targets,
    subjects, aliases and correction ids in the metadata."""
    hidden = centre.numel()
    tensors = {
        "centre": centre.float().contiguous(),
        "keys": torch.stack([e.key.float() for e in entries]) if entries else torch.zeros(0, hidden),
        "leads": memory_model.optional_rows([e.lead for e in entries], hidden),
        "has_lead": torch.tensor([e.lead is not None for e in entries], dtype=torch.uint8),
        "relations": memory_model.optional_rows([e.relation for e in entries], hidden),
        "has_relation": torch.tensor([e.relation is not None for e in entries], dtype=torch.uint8),
        "floors": torch.tensor([e.floor for e in entries]),
    }
    for i, entry in enumerate(entries):
        for name, update in entry.update.items():
            tensors[f"{i}/{name}/inputs"] = update.inputs.contiguous()
            tensors[f"{i}/{name}/outputs"] = (update.outputs * update.scale).contiguous()
    if reader is not None:
        tensors.update(memory_model.reader_tensors(reader, "reader/"))
    write_tensor_file(path, tensors, metadata={
        "layer": str(layer), "tau": str(tau), "margin": str(margin), "version": version,
        **({"relation_floor": str(reader.floor)} if reader is not None else {}),
        "correction_ids": json.dumps([e.correction_id for e in entries]),
        "targets": json.dumps([e.target for e in entries]), "subjects": json.dumps([e.subject for e in entries]),
        "aliases": json.dumps([list(e.aliases) for e in entries])})


def name_routed_class(config_path: Path) -> None:
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("model_type") != "llama":
        raise ExportError(f"a routed version exports only for Llama-style models; this one is {config.get('model_type')}")
    config["architectures"] = [ROUTED_CLASS]
    config["auto_map"] = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{ROUTED_CLASS}"}
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
