"""What does a version cost in the store? Prints one JSON object.

A fresh store holds the default model as v0000; one version applying 16 CounterFact corrections
with the shipped MEND editor (factors rounded for storage, as the service's editor does) is
committed on top, then rolled back.

- cache_bytes_over_changed_bytes: bytes that commit added to the DVC cache (changed tensors, the
  corrections' factors, DVC's folder manifests) / bytes of the changed tensor files (bar: <= 1.1);
  also without the factors, which are what makes ``mendd revert`` exact.
- commit_over_write_hash: seconds of the commit (files, dvc add, git commit and tag, ledger) /
  seconds to write the same tensor files and md5-hash them, measured here (bar: <= 1.5). Computing
  the new values (expanding the low-rank delta, adding it to the head) is timed apart: change_s.
- rollback_s, peak_rss_mb, and the sizes behind the ratios.

    python bench/store_cost.py [--model smollm2-135m] [--corrections 16]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import resource
import tempfile
import time
from pathlib import Path

from daemon.commits import commit_change, edit_change, rollback
from daemon.config import load_config
from daemon.home import Home, init_home
from daemon.versioning import create_versions, open_versions
from editors.editable import Editable
from editors.formats import load_corrections
from editors.registry import guarded, make_editor
from policies.probes import data_dir
from store.checkpoint import tensor_file, write_tensors
from store.models import load_model


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def write_and_hash_seconds(tensors: dict, folder: Path) -> float:
    """The floor a commit is held to: write the changed tensor files and hash them once (md5, as DVC)."""
    started = time.perf_counter()
    write_tensors(folder, tensors)
    for name in tensors:
        hashlib.md5((folder / tensor_file(name)).read_bytes()).hexdigest()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--corrections", type=int, default=16)
    args = parser.parse_args()

    loaded = load_model(args.model)
    editable = Editable(loaded.model, loaded.tokenizer)
    corrections, _ = load_corrections(data_dir() / "counterfact" / "val.json", limit=args.corrections)
    # The service's editor, factors rounded for storage; the projection (off here: its key statistics
    # take minutes to measure) changes the factors' values, not their number or size.
    editor = guarded(make_editor("mend", editable, args.model), editable, None, None, None)
    delta = editor.propose(editable, corrections)

    with tempfile.TemporaryDirectory(prefix="mendd-store-cost-") as scratch:
        home = init_home(Home(Path(scratch) / "home"), args.model)
        started = time.perf_counter()
        create_versions(home, loaded.model, loaded.tokenizer, args.model)
        init_s = time.perf_counter() - started
        versions = open_versions(home, load_config(home))
        for correction in corrections:
            versions.ledger.receive("bench", correction.id, {"prompt": correction.prompt, "target": correction.target_new})
        cache = home.store_dir / ".dvc" / "cache"
        cache_before = folder_bytes(cache)

        started = time.perf_counter()
        change = edit_change(versions, delta, run_id="bench", figures={})
        change_s = time.perf_counter() - started
        started = time.perf_counter()
        commit_change(versions, change)
        commit_s = time.perf_counter() - started

        cache_added = folder_bytes(cache) - cache_before
        changed = change.tensors
        changed_bytes = sum((home.store_dir / "model" / tensor_file(name)).stat().st_size for name in changed)
        floor_dir = Path(scratch) / "floor"
        floor_dir.mkdir()
        floor_s = write_and_hash_seconds(versions.store.read_tensors(list(changed)), floor_dir)

        factor_bytes = versions.store.factors_path("v0001").stat().st_size
        started = time.perf_counter()
        rollback(versions, "v0000", reason="bench")
        rollback_s = time.perf_counter() - started
        versions.close()

        print(json.dumps({
            "model": args.model,
            "corrections": len(delta.correction_ids),
            "full_checkpoint_bytes": folder_bytes(home.store_dir / "model"),
            "changed_tensors": len(changed),
            "changed_bytes": changed_bytes,
            "factor_bytes": factor_bytes,
            "cache_bytes_added": cache_added,
            "cache_bytes_over_changed_bytes": round(cache_added / changed_bytes, 3),
            "cache_bytes_over_changed_bytes_without_factors": round((cache_added - factor_bytes) / changed_bytes, 3),
            "init_s": round(init_s, 2),
            "commit_s": round(commit_s, 3),
            "change_s": round(change_s, 3),
            "write_hash_s": round(floor_s, 3),
            "commit_over_write_hash": round(commit_s / floor_s, 2),
            "rollback_s": round(rollback_s, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }))


if __name__ == "__main__":
    main()
