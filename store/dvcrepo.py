"""DVC, used in-process through its Python API.

The API rather than the ``dvc`` command because each command start costs about a second of
imports; a commit needs several DVC steps and should cost little more than writing its files. One
``Repo`` is opened per store and kept: opening it costs tens of milliseconds, and DVC re-reads the
.dvc files under its own lock at the start of every operation, so a kept one is never stale.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from store.errors import StoreError

REMOTE = "origin"


def _quiet() -> None:
    # DVC logs hints meant for people typing its commands ("run git add ..."); mendd does that part.
    logging.getLogger("dvc").setLevel(logging.WARNING)


def init(root: Path) -> None:
    """Make ``root`` (a git repository) a DVC repository: no analytics, cache in copy mode."""
    from dvc.repo import Repo

    _quiet()
    Repo.init(str(root)).close()
    dvc = DvcRepo(root)
    with dvc._reporting() as repo, repo.config.edit("repo") as config:
        config["core"]["analytics"] = "false"
        # Copy, never link: a hard- or symlinked workspace file would let a write reach the cache.
        config["cache"]["type"] = "copy"
    dvc.close()


def out_md5(dvc_file_text: str) -> str:
    """The hash of the one output a .dvc file tracks (``<md5>.dir`` for a folder)."""
    outs = yaml.safe_load(dvc_file_text)["outs"]
    return outs[0]["md5"]


class DvcRepo:
    def __init__(self, root: Path):
        self.root = Path(root)
        self._repo: Any = None

    def close(self) -> None:
        if self._repo is not None:
            self._repo.close()
            self._repo = None

    @contextmanager
    def _reporting(self) -> Iterator[Any]:
        """The open repository; DVC's errors, and the OSErrors of its file systems (a remote that
        cannot be reached, a full disk), become StoreErrors naming the store."""
        from dvc.exceptions import DvcException
        from dvc.repo import Repo

        _quiet()
        try:
            if self._repo is None:
                self._repo = Repo(str(self.root))
            yield self._repo
        except (DvcException, OSError) as exc:
            raise StoreError(f"DVC failed in {self.root}: {exc}") from exc

    def set_remote(self, url: str | None) -> None:
        """Point the default remote at ``url`` in the git-ignored local config (it belongs to this
        host's mendd.yaml, not to the store's history)."""
        with self._reporting() as repo, repo.config.edit("local") as config:
            if url is None:
                config.get("remote", {}).pop(REMOTE, None)
                config.get("core", {}).pop("remote", None)
            else:
                config.setdefault("remote", {})[REMOTE] = {"url": url}
                config.setdefault("core", {})["remote"] = REMOTE

    def remote_url(self) -> str | None:
        with self._reporting() as repo:
            return repo.config.get("remote", {}).get(REMOTE, {}).get("url")

    def add(self, targets: list[str]) -> None:
        with self._reporting() as repo:
            # Absolute paths: DVC resolves relative targets against the process's working directory.
            repo.add([str(self.root / target) for target in targets])

    def checkout(self, targets: list[str]) -> None:
        """Make the workspace equal to the .dvc files: restore changed files, delete extra ones."""
        with self._reporting() as repo:
            repo.checkout(targets=[str(self.root / target) for target in targets], force=True)

    def changes(self) -> dict:
        """What ``dvc status`` reports; empty when the workspace matches every .dvc file."""
        with self._reporting() as repo:
            return repo.status()

    def push(self) -> None:
        with self._reporting() as repo:
            repo.push(remote=REMOTE)

    def fetch(self, rev: str, target: str) -> None:
        """Download the objects that ``target`` (a .dvc file) names at git revision ``rev``."""
        with self._reporting() as repo:
            repo.fetch(targets=[target], revs=[rev], remote=REMOTE)

    def missing_objects(self, dir_md5: str) -> list[str]:
        """Files of the tracked folder with hash ``dir_md5`` that the local cache lacks."""
        with self._reporting() as repo:
            cache = repo.cache.local
            if not cache.exists(dir_md5):
                return [dir_md5]
            entries = json.loads(Path(cache.oid_to_path(dir_md5)).read_text(encoding="utf-8"))
            return [entry["relpath"] for entry in entries if not cache.exists(entry["md5"])]
