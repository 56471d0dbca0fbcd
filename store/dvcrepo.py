"""DVC, used in-process through its Python API.

The API rather than the ``dvc`` command because each command start costs about a second of
imports; a commit needs several DVC steps and should cost little more than writing its files. One
``Repo`` is opened per store and kept: opening it costs tens of milliseconds, and DVC re-reads the
.dvc files under its own lock at the start of every operation, so a kept one is never stale.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from store.errors import StoreError

REMOTE = "origin"
SITE_ENV = "DVC_SITE_CACHE_DIR"
# A push sends only the files the remote lacks (a version's changed tensors): minutes at most, on
# any link that can hold a model's store. A push stopped here is retried by the next one.
PUSH_TIMEOUT_S = 900.0


def _quiet() -> None:
    # DVC logs hints meant for people typing its commands ("run git add ..."); mendd does that part.
    logging.getLogger("dvc").setLevel(logging.WARNING)


def init(root: Path) -> None:
    """Make ``root`` (a git repository) a DVC repository: no analytics, cache in copy mode."""
    from dvc.config import Config
    from dvc.repo import Repo

    _quiet()
    # Repo.init opens the new repository once, before any config can say where DVC's state goes;
    # DVC's environment variable, set only around this call, keeps even that inside the store.
    before = os.environ.get(SITE_ENV)
    os.environ[SITE_ENV] = str(state_dir(root))
    try:
        Repo.init(str(root)).close()
    finally:
        if before is None:
            os.environ.pop(SITE_ENV)
        else:
            os.environ[SITE_ENV] = before
    with Config(dvc_dir=str(root / ".dvc")).edit("repo") as config:
        config["core"]["analytics"] = "false"
        # Copy, never link: a hard- or symlinked workspace file would let a write reach the cache.
        config["cache"]["type"] = "copy"


def _drop_torn_rwlock(root: Path) -> None:
    """A DVC process killed while writing `.dvc/tmp/rwlock` leaves it empty or half-written, and every
    later DVC call in the store then fails ("JSON structure is corrupted"). A file that does not parse
    records no lock, so it protects nothing: remove it (found by the kill test)."""
    path = root / ".dvc" / "tmp" / "rwlock"
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return
    except (UnicodeDecodeError, json.JSONDecodeError):
        logging.getLogger("mendd.store").warning("removing a torn DVC lock file %s (a killed DVC process left it)", path)
        path.unlink(missing_ok=True)


def state_dir(root: Path) -> Path:
    """Where DVC keeps its state for this store (git-ignored, like all of .dvc/tmp)."""
    return root / ".dvc" / "tmp" / "site"


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
        _drop_torn_rwlock(self.root)
        try:
            if self._repo is None:
                self._repo = Repo(str(self.root))
            yield self._repo
        except (DvcException, OSError) as exc:
            raise StoreError(f"DVC failed in {self.root}: {exc}") from exc

    def configure(self, remote: str | None) -> None:
        """This host's settings, in the git-ignored local config (they belong to mendd.yaml and the
        home's place on disk, not to the store's history): the default remote, and DVC's state
        (its cache of file hashes) inside the store rather than in /var/tmp/dvc, so the home holds
        all of its state and can be moved or deleted as a unit."""
        from dvc.config import Config

        wanted = {"site_cache_dir": str(state_dir(self.root)), "remote": remote}
        # Through the config alone: opening the repository would already create its state.
        config = Config(dvc_dir=str(self.root / ".dvc"))
        local = config.load_one("local")
        found = {"site_cache_dir": local.get("core", {}).get("site_cache_dir"),
                 "remote": local.get("remote", {}).get(REMOTE, {}).get("url")}
        if found == wanted:
            return
        with config.edit("local") as values:
            values.setdefault("core", {})["site_cache_dir"] = wanted["site_cache_dir"]
            if remote is None:
                values.get("remote", {}).pop(REMOTE, None)
                values["core"].pop("remote", None)
            else:
                values.setdefault("remote", {})[REMOTE] = {"url": remote}
                values["core"]["remote"] = REMOTE
        self.close()  # an open repository read the old settings; the next call reopens it

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
        """``dvc push`` as a command, not through the API, so that it can be stopped: a remote that
        stalls must not hold the home lock (and the service's worker) for ever."""
        command = [sys.executable, "-m", "dvc", "push", "--quiet", "--remote", REMOTE]
        _drop_torn_rwlock(self.root)
        try:
            result = subprocess.run(command, cwd=self.root, capture_output=True, text=True, timeout=PUSH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise StoreError(f"dvc push from {self.root} did not finish in {PUSH_TIMEOUT_S:.0f} s; it was stopped "
                             "(the next push sends what is missing)") from None
        if result.returncode != 0:
            raise StoreError(f"DVC failed in {self.root}: dvc push: {result.stderr.strip() or result.stdout.strip()}")

    def fetch(self, rev: str, target: str) -> None:
        """Download the objects that ``target`` (a .dvc file) names at git revision ``rev``."""
        with self._reporting() as repo:
            repo.fetch(targets=[target], revs=[rev], remote=REMOTE)

    def copy_folder(self, dir_md5: str, dest: Path) -> None:
        """The tracked folder with hash ``dir_md5``, as the local cache holds it, copied into ``dest``."""
        import shutil

        with self._reporting() as repo:
            cache = repo.cache.local
            entries = json.loads(Path(cache.oid_to_path(dir_md5)).read_text(encoding="utf-8"))
            for entry in entries:
                target = dest / entry["relpath"]
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(cache.oid_to_path(entry["md5"]), target)

    def missing_objects(self, dir_md5: str) -> list[str]:
        """Files of the tracked folder with hash ``dir_md5`` that the local cache lacks."""
        with self._reporting() as repo:
            cache = repo.cache.local
            if not cache.exists(dir_md5):
                return [dir_md5]
            entries = json.loads(Path(cache.oid_to_path(dir_md5)).read_text(encoding="utf-8"))
            return [entry["relpath"] for entry in entries if not cache.exists(entry["md5"])]
