"""DVC, used in-process through its Python API.

The API rather than the ``dvc`` command because each command start costs about a second of
imports; a commit needs several DVC steps and should cost little more than writing its files.
Each call opens the repository and closes it again, so no DVC lock is held between steps.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from store.errors import StoreError

REMOTE = "origin"


def _quiet() -> None:
    # DVC logs hints meant for people typing its commands ("run git add ..."); mendd does that part.
    logging.getLogger("dvc").setLevel(logging.WARNING)


@contextmanager
def _opened(root: Path) -> Iterator:
    _quiet()
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            yield repo
    except DvcException as exc:
        raise StoreError(f"DVC failed in {root}: {exc}") from exc


def init(root: Path) -> None:
    """Make ``root`` (a git repository) a DVC repository: no analytics, cache in copy mode."""
    from dvc.repo import Repo

    _quiet()
    Repo.init(str(root)).close()
    with _opened(root) as repo, repo.config.edit("repo") as config:
        config["core"]["analytics"] = "false"
        # Copy, never link: a hard- or symlinked workspace file would let a write reach the cache.
        config["cache"]["type"] = "copy"


def set_remote(root: Path, url: str | None) -> None:
    """Point the default remote at ``url`` in the git-ignored local config (it belongs to this
    host's mendd.yaml, not to the store's history)."""
    with _opened(root) as repo, repo.config.edit("local") as config:
        if url is None:
            config.get("remote", {}).pop(REMOTE, None)
            config.get("core", {}).pop("remote", None)
        else:
            config.setdefault("remote", {})[REMOTE] = {"url": url}
            config.setdefault("core", {})["remote"] = REMOTE


def remote_url(root: Path) -> str | None:
    with _opened(root) as repo:
        return repo.config.get("remote", {}).get(REMOTE, {}).get("url")


def add(root: Path, targets: list[str]) -> None:
    with _opened(root) as repo:
        # Absolute paths: DVC resolves relative targets against the process's working directory.
        repo.add([str(root / target) for target in targets])


def checkout(root: Path, targets: list[str]) -> None:
    """Make the workspace equal to the .dvc files: restore changed files, delete extra ones."""
    with _opened(root) as repo:
        repo.checkout(targets=[str(root / target) for target in targets], force=True)


def changes(root: Path) -> dict:
    """What ``dvc status`` reports; empty when the workspace matches every .dvc file."""
    with _opened(root) as repo:
        return repo.status()


def push(root: Path) -> None:
    with _opened(root) as repo:
        repo.push(remote=REMOTE)


def fetch(root: Path, rev: str, target: str) -> None:
    """Download the objects that ``target`` (a .dvc file) names at git revision ``rev``."""
    with _opened(root) as repo:
        repo.fetch(targets=[target], revs=[rev], remote=REMOTE)


def out_md5(dvc_file_text: str) -> str:
    """The hash of the one output a .dvc file tracks (``<md5>.dir`` for a folder)."""
    outs = yaml.safe_load(dvc_file_text)["outs"]
    return outs[0]["md5"]


def missing_objects(root: Path, dir_md5: str) -> list[str]:
    """Files of the tracked folder with hash ``dir_md5`` that the local cache lacks."""
    with _opened(root) as repo:
        cache = repo.cache.local
        if not cache.exists(dir_md5):
            return [dir_md5]
        entries = json.loads(Path(cache.oid_to_path(dir_md5)).read_text(encoding="utf-8"))
        return [entry["relpath"] for entry in entries if not cache.exists(entry["md5"])]
