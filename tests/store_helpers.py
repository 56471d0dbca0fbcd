"""Shared by the version-store tests and the crash child process: a home on tiny-llama, real MEND
deltas, and file digests."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from daemon.config import load_config
from daemon.home import Home, init_home
from daemon.versioning import Versions, create_versions, open_versions
from editors.editable import Editable
from editors.mend import MendEditor
from editors.types import Correction, Delta
from store.models import load_model

FACTS = [
    Correction("c1", "The capital of France is", "Rome", target_old="Paris"),
    Correction("c2", "BBC One, by", "Sega", target_old="BBC"),
    Correction("c3", "Danielle Darrieux's mother tongue is", "English", target_old="French"),
]
BIN = Path(sys.executable).parent


def make_home(root: Path, remote: str | None = None) -> Home:
    """A mendd home on tiny-llama with v0000 committed and FACTS received as pending."""
    home = init_home(Home(root), "tiny-llama")
    if remote is not None:
        config = home.config_path
        config.write_text(config.read_text().replace("remote: null", f"remote: {remote!r}"))
    loaded = load_model("tiny-llama")
    create_versions(home, loaded.model, loaded.tokenizer, "tiny-llama")
    versions = open_home(home)
    try:
        for fact in FACTS:
            versions.ledger.receive("test-feed", fact.id, {"prompt": fact.prompt, "target_new": fact.target_new})
    finally:
        versions.close()
    return home


def open_home(home: Home) -> Versions:
    return open_versions(home, load_config(home))


def mend_delta(facts: list[Correction]) -> Delta:
    """A real MEND delta on tiny-llama (a fresh editor, a visible step), the same in every process."""
    loaded = load_model("tiny-llama")
    editable = Editable(loaded.model, loaded.tokenizer)
    return MendEditor.fresh(editable, edit_lr=1e-2).propose(editable, facts)


def digests(model_dir: Path) -> dict[str, str]:
    """sha256 of every tensor file in a checkpoint folder."""
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(model_dir.glob("*.safetensors"))}


def tool(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real git or dvc command, run in the store as an operator would."""
    command = [str(BIN / "dvc"), *args[1:]] if args[0] == "dvc" else list(args)
    return subprocess.run(command, cwd=store, capture_output=True, text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})


def store_is_clean(store: Path) -> bool:
    """`dvc status` reports nothing and `git status` shows no change, from the real commands."""
    dvc = tool(store, "dvc", "status", "--json")
    git = tool(store, "git", "status", "--porcelain")
    return dvc.returncode == 0 and dvc.stdout.strip() in ("{}", "") and git.stdout == ""
