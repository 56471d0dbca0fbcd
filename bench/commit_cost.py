"""What one version's commit costs as the memory grows (issue #22: flat per-decision cost).

A routed version adds one memory chunk file (model/memory/<tag>.safetensors) and commits it as the
store does (store/versions.py `_seal`): `dvc add` of the model folder through DVC's API, then `git
add` and `git commit` of its .dvc file, in a real git+DVC repository. DVC keeps each file's hash in
its state database keyed by inode, size and modification time, so the chunks a commit did not touch
are stat-ed, not read again: the question is how much that walk costs at 1,000 chunks (T = 10,000
at batches of 10) against 100. Chunks are random bytes of a real chunk's size; the folder also holds
the model's own 273 tensor files, as a store does.

    python bench/commit_cost.py [--chunks 100 1000] [--repeat 5] [--out bench/results/commit_cost.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from store import dvcrepo
from report import report

CHUNK_BYTES = 240_000  # a batch of 10 compressed entries, headers included (bench/results/memory_compression_N100.json)
MODEL_FILES = 273  # SmolLM2-135M's tensors, one file each
MODEL_FILE_BYTES = 4096  # their size does not matter to a stat walk: kept small so the setup is quick


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def repository(root: Path, chunks: int) -> dvcrepo.DvcRepo:
    """A git+DVC repository whose model/ holds the model's files and `chunks` memory chunks, committed."""
    git(root, "init", "-q")
    git(root, "config", "user.email", "bench@mendd")
    git(root, "config", "user.name", "bench")
    dvcrepo.init(root)
    memory = root / "model" / "memory"
    memory.mkdir(parents=True)
    for i in range(MODEL_FILES):
        (root / "model" / f"tensor{i}.safetensors").write_bytes(os.urandom(MODEL_FILE_BYTES))
    for i in range(chunks):
        (memory / f"v{i:05d}.safetensors").write_bytes(os.urandom(CHUNK_BYTES))
    repo = dvcrepo.DvcRepo(root)
    repo.add(["model"])
    git(root, "add", "-A")
    git(root, "commit", "-qm", "start")
    return repo


def commit_seconds(root: Path, repo: dvcrepo.DvcRepo, number: int) -> tuple[float, float]:
    """(dvc add, git add+commit) seconds for one new chunk."""
    (root / "model" / "memory" / f"new{number:05d}.safetensors").write_bytes(os.urandom(CHUNK_BYTES))
    started = time.perf_counter()
    repo.add(["model"])
    added = time.perf_counter()
    git(root, "add", "model.dvc")
    git(root, "commit", "-qm", f"version {number}")
    return added - started, time.perf_counter() - added


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = {}
    for chunks in args.chunks:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            repo = repository(root, chunks)
            try:
                commit_seconds(root, repo, 0)  # the first add after opening fills DVC's state: not a decision's cost
                timed = [commit_seconds(root, repo, n) for n in range(1, args.repeat + 1)]
            finally:
                repo.close()
        rows[str(chunks)] = {"dvc_add_s": round(statistics.median(t[0] for t in timed), 4),
                             "git_commit_s": round(statistics.median(t[1] for t in timed), 4),
                             "files": chunks + MODEL_FILES}
        print(json.dumps({chunks: rows[str(chunks)]}), flush=True)
    first, last = rows[str(args.chunks[0])], rows[str(args.chunks[-1])]
    total = lambda row: row["dvc_add_s"] + row["git_commit_s"]  # noqa: E731
    summary = {"chunk_bytes": CHUNK_BYTES, "repeat": args.repeat, "chunks": rows,
               "commit_s_ratio_last_to_first": round(total(last) / total(first), 3)}
    report(summary, args.out)


if __name__ == "__main__":
    main()
