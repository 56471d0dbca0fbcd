"""The version store: a git repository with DVC whose tracked folder ``model/`` is the served model.

Every version is a git commit tagged ``vNNNN`` whose ``model.dvc`` names the model's files in the
DVC cache. ``factors/`` (a second tracked folder, append-only) keeps each correction's low-rank
factors beside the version that applied it, one compressed file per version, so one correction
can later be subtracted exactly.
The commit message carries the version's metadata as one JSON line, its last (a trailer), so
``git log`` alone lists every version, and a commit that crashed before its tag can still be finished.
Only that line is read, strictly, and every line above it shows ids and reasons escaped, so no
correction's content or operator's text can forge a version or break reading the history.

A commit runs: journal -> write files -> ``dvc add`` -> ``git commit`` -> ``git tag`` -> clear
journal. Pushing to the remote is a separate step (:meth:`VersionStore.push`), so an unreachable
remote never leaves a commit half-done. :meth:`VersionStore.recover` turns a crash anywhere in that into the old or the new
version (store/recovery rules are in :meth:`recover`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from store import dvcrepo, journal
from store.dvcrepo import DvcRepo
from store.checkpoint import (
    COMPRESSED,
    fsync_dir,
    SUFFIX,
    dtype_code,
    tensor_layout,
    read_tensor_file_with_metadata,
    read_tensors,
    remove_partials,
    save_model,
    tensor_names,
    write_tensor_file,
    write_tensors,
)
from store.crash import DVC_ADDED, GIT_COMMITTED, ROLLBACK_CHECKED_OUT, TAGGED, TENSORS_WRITTEN, crash_point
from store.errors import DirtyStoreError, MissingObjectsError, StoreError, UnknownVersionError
from store.git import changed_paths, git, git_ok

MODEL = "model"
MEMORY = "memory"  # inside model/: a routed memory's chunks, one per version that added entries
FACTORS = "factors"
MODEL_DVC = f"{MODEL}.dvc"
FACTORS_DVC = f"{FACTORS}.dvc"
META_PREFIX = "mendd-version: "
BRANCH = "main"

VersionKind = Literal["base", "edit", "rollback", "revert"]
WorkspaceState = Literal["clean", "checked-out", "dirty"]


@dataclass(frozen=True)
class Version:
    tag: str
    sha: str
    parent: str | None  # the previous version's tag
    kind: VersionKind
    created_at: datetime
    corrections: tuple[str, ...]  # applied (edit) or removed (revert) by this version
    run_id: str | None
    restores: str | None  # for a rollback: the version whose model this one serves again
    reason: str
    figures: dict[str, float]
    model_md5: str  # DVC's hash of model/: equal hashes, equal models

    @property
    def number(self) -> int:
        return tag_number(self.tag)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["created_at"] = self.created_at.isoformat()
        data["corrections"] = list(self.corrections)
        return data


@dataclass(frozen=True)
class StoredShare:
    """One correction's weight change (or a batch's, when an editor cannot separate them), as
    plain tensors: the daemon decides what the tensors mean."""

    correction_ids: tuple[str, ...]
    tensors: dict[str, torch.Tensor]


@dataclass(frozen=True)
class MemoryChunk:
    """Entries of a routed memory that one version added, as plain tensors (the daemon decides what
    they mean): one share per entry, tensors common to the chunk, and string metadata."""

    shares: tuple[StoredShare, ...]
    common: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Change:
    """What a new edit or revert version holds: the new values of the tensors it changes, and the
    routed-memory chunks it adds (``model/memory/<its tag>``) or rewrites (by name; None removes one)."""

    kind: Literal["edit", "revert"]
    tensors: dict[str, torch.Tensor]
    shares: tuple[StoredShare, ...] = ()
    memory_added: MemoryChunk | None = None
    memory_rewritten: dict[str, MemoryChunk | None] = field(default_factory=dict)
    corrections: tuple[str, ...] = ()
    run_id: str | None = None
    reason: str = ""
    figures: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Workspace:
    """What ``model/`` holds now. ``checked-out``: an operator's ``git checkout vNNNN -- model.dvc
    && dvc checkout`` left it equal to ``version``, not to the last commit."""

    state: WorkspaceState
    version: Version | None
    details: tuple[str, ...] = ()


@dataclass(frozen=True)
class Recovery:
    """What recovery did at start: ``none``, ``undone`` (back to the old version) or ``completed``
    (the interrupted commit was already in git, so it was finished)."""

    action: Literal["none", "undone", "completed"]
    tag: str | None = None
    removed: tuple[str, ...] = ()


def tag_name(number: int) -> str:
    return f"v{number:04d}"


def tag_number(tag: str) -> int:
    if len(tag) < 2 or tag[0] != "v" or not tag[1:].isdigit():
        raise UnknownVersionError(f"{tag!r} is not a version tag; tags look like v0003 (see `mendd versions`)")
    return int(tag[1:])


class VersionStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.model_dir = self.root / MODEL
        self.factors_dir = self.root / FACTORS
        self.dvc = DvcRepo(self.root)

    def close(self) -> None:
        self.dvc.close()

    # -- creating -----------------------------------------------------------------------------

    @classmethod
    def create(cls, root: Path, model: torch.nn.Module, tokenizer, spec: str) -> VersionStore:
        """Build the repository beside ``root`` and rename it into place, so a crash during
        creation leaves no half-made store; commit the base model as v0000."""
        root = Path(root)
        if (root / ".git").exists():
            raise StoreError(f"{root} is already a version store")
        if root.exists() and any(root.iterdir()):
            raise StoreError(f"{root} is not empty and not a version store; move its contents away and retry")
        root.parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
        try:
            store = cls(building)
            store._init_repository()
            save_model(store.model_dir, model, tokenizer)
            store.factors_dir.mkdir()
            (store.factors_dir / "README").write_text(
                "Low-rank factors of each correction, one gzip-compressed safetensors file per version: "
                "mendd revert subtracts them exactly.\n", encoding="utf-8")
            store._seal(tag_name(0), None, {"kind": "base", "reason": f"base model {spec}"})
            store.close()
            if root.exists():
                root.rmdir()  # the empty folder `mendd init` made; a non-empty one fails here
            building.rename(root)
        finally:
            shutil.rmtree(building, ignore_errors=True)
        created = cls(root)
        created.configure(None)
        # DVC remembers file hashes by path; after the rename it hashes every file once, here at
        # init rather than in the first commit, and this proves the moved store is clean.
        created.require_clean()
        return created

    def _init_repository(self) -> None:
        git(self.root, "init", "-q", "-b", BRANCH)
        for key, value in (("user.name", "mendd"), ("user.email", "mendd@localhost"),
                           ("commit.gpgsign", "false"), ("tag.gpgsign", "false")):
            git(self.root, "config", key, value)
        dvcrepo.init(self.root)
        self.configure(None)
        (self.root / ".gitignore").write_text(f"/{journal.JOURNAL}\n/{journal.JOURNAL}.partial\n", encoding="utf-8")

    def exists(self) -> bool:
        return (self.root / ".git").is_dir() and git_ok(self.root, "rev-parse", "--verify", "-q", f"refs/tags/{tag_name(0)}")

    def configure(self, remote: str | None) -> None:
        """Point pushes at ``remote`` (None: no remote) and keep DVC's state inside the store."""
        self.dvc.configure(remote)

    # -- reading ------------------------------------------------------------------------------

    def versions(self) -> list[Version]:
        """Every version on the branch, oldest first, from one ``git log``."""
        return list(reversed(self._log("HEAD")))

    def head(self) -> Version:
        found = self._log("-1", "HEAD")
        if not found:
            raise StoreError(f"{self.root} has no versions; create it with `mendd init`")
        return found[0]

    def version(self, tag: str) -> Version:
        tag_number(tag)
        found = self._log("-1", f"refs/tags/{tag}") if git_ok(self.root, "rev-parse", "-q", "--verify", f"refs/tags/{tag}") else []
        if not found or found[0].tag != tag:
            raise UnknownVersionError(f"no version {tag} in {self.root}; `mendd versions` lists them")
        return found[0]

    def _log(self, *revisions: str) -> list[Version]:
        """Versions among the first-parent commits of ``revisions``, newest first."""
        # NUL ends each commit (git refuses one in a message); sha and date are one line each.
        log = git(self.root, "log", "-z", "--first-parent", "--format=%H%n%cI%n%B", *revisions)
        found: list[Version] = []
        for record in filter(None, log.split("\0")):
            sha, date, message = record.split("\n", 2)
            try:
                meta = _metadata(message)
            except ValueError as error:
                raise StoreError(
                    f"{self.root}: commit {sha[:12]} ends in a {META_PREFIX.strip()} line that is not valid version "
                    f"metadata ({error}); mendd did not write it: inspect it with `git show {sha[:12]}`") from None
            if meta is not None:
                found.append(_version(sha, date, meta))
        return found

    def tensor_names(self) -> list[str]:
        return tensor_names(self.model_dir)

    def read_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Tensors of the model in the workspace (the head version when the store is clean)."""
        return read_tensors(self.model_dir, names)

    def shares(self, tag: str) -> list[StoredShare]:
        """The factors kept with version ``tag`` (empty for versions that applied none)."""
        path = self.factors_path(tag)
        return read_shares(path)[0] if path.exists() else []

    @property
    def memory_dir(self) -> Path:
        return self.model_dir / MEMORY

    def has_memory(self) -> bool:
        return self.memory_dir.exists() and any(self.memory_dir.glob(f"v*{SUFFIX}"))

    def memory_chunks(self) -> list[tuple[str, MemoryChunk]]:
        """The routed memory in the workspace's model/ (the head's, once the store is clean), oldest chunk first."""
        if not self.memory_dir.exists():
            return []
        return [(path.name[: -len(SUFFIX)], read_memory_chunk(path)) for path in sorted(self.memory_dir.glob(f"v*{SUFFIX}"))]

    def memory_chunk(self, tag: str) -> MemoryChunk | None:
        """The entries version `tag` added that the workspace still holds; None if it added none."""
        path = self.memory_dir / f"{tag}{SUFFIX}"
        return read_memory_chunk(path) if path.exists() else None

    def _write_memory(self, tag: str, change: Change) -> None:
        chunks = dict(change.memory_rewritten)
        if change.memory_added is not None:
            chunks[tag] = change.memory_added
        if not chunks:
            return
        self.memory_dir.mkdir(exist_ok=True)
        for name, chunk in chunks.items():
            path = self.memory_dir / f"{name}{SUFFIX}"
            if chunk is None or not chunk.shares:
                path.unlink(missing_ok=True)
            else:
                write_shares(path, chunk.shares, chunk.metadata, chunk.common)
        fsync_dir(self.memory_dir)

    def factors_path(self, tag: str) -> Path:
        return self.factors_dir / f"{tag}{SUFFIX}{COMPRESSED}"

    # -- the workspace ------------------------------------------------------------------------

    def workspace(self) -> Workspace:
        head = self.head()
        dirty_git = [path for path in changed_paths(self.root) if path != MODEL_DVC]
        dvc_changes = self.dvc.changes()
        details = tuple(f"git: {path}" for path in dirty_git) + tuple(f"dvc: {name} {change}" for name, change in dvc_changes.items())
        if details:
            return Workspace("dirty", None, details)
        md5 = dvcrepo.out_md5((self.root / MODEL_DVC).read_text(encoding="utf-8"))
        if md5 == head.model_md5:
            return Workspace("clean", head)
        matching = [v for v in self.versions() if v.model_md5 == md5]
        if matching:
            return Workspace("checked-out", matching[-1])
        return Workspace("dirty", None, (f"git: {MODEL_DVC} names a model that is no version",))

    def require_clean(self) -> Version:
        """The head version, if the workspace is exactly it; else why not, and the fix."""
        if journal.pending(self.root) is not None:
            raise StoreError(f"{self.root} has an interrupted commit; run recovery first (any `mendd` command that changes the store does)")
        current = self.workspace()
        if current.state == "clean":
            return current.version
        if current.state == "checked-out":
            raise DirtyStoreError(
                f"{self.root}: model/ was checked out to {current.version.tag} by hand; mendd adopts that at "
                "start (or `mendd rollback` it), and changes nothing until then")
        raise DirtyStoreError(
            f"{self.root} has changes mendd did not make ({'; '.join(current.details)}). Undo them in "
            f"{self.root} with `git checkout -- . && dvc checkout`, then retry. Nothing was changed.")

    # -- writing ------------------------------------------------------------------------------

    def commit(self, change: Change) -> Version:
        """A new version: the head plus ``change``."""
        head = self.require_clean()
        self._check_tensors(change.tensors)
        tag = tag_name(head.number + 1)
        journal.begin(self.root, journal.Intent(tag, head.sha, change.kind))
        # Compressing the factors runs beside the tensor writes (zlib and file I/O release the GIL).
        with ThreadPoolExecutor(max_workers=1) as pool:
            shares_written = pool.submit(self._write_shares, tag, change.shares)
            write_tensors(self.model_dir, change.tensors)
            self._write_memory(tag, change)
            shares_written.result()
        crash_point(TENSORS_WRITTEN)
        return self._seal(tag, head.tag, {"kind": change.kind, "corrections": list(change.corrections), "run_id": change.run_id,
                                "reason": change.reason, "figures": change.figures})

    def rollback(self, tag: str, reason: str) -> Version:
        """A new version whose model equals ``tag``'s, exactly what an operator's
        ``git checkout tag -- model.dvc && dvc checkout`` does, then committed on top."""
        head = self.require_clean()
        target = self.version(tag)
        if target.tag == head.tag:
            raise StoreError(f"{tag} is already the current version; nothing to roll back")
        self._ensure_objects(target)
        tag = tag_name(head.number + 1)
        journal.begin(self.root, journal.Intent(tag, head.sha, "rollback"))
        git(self.root, "checkout", target.sha, "--", MODEL_DVC)
        crash_point(ROLLBACK_CHECKED_OUT)
        self.dvc.checkout([MODEL])
        return self._seal(tag, head.tag, {"kind": "rollback", "restores": target.tag, "reason": reason})

    def adopt_checkout(self, reason: str) -> Version:
        """Commit an operator's own checkout of an earlier version as a rollback to it."""
        current = self.workspace()
        if current.state != "checked-out":
            raise StoreError(f"{self.root}: model/ is {current.state}, not a checkout of an earlier version")
        head = self.head()
        tag = tag_name(head.number + 1)
        journal.begin(self.root, journal.Intent(tag, head.sha, "rollback"))
        return self._seal(tag, head.tag, {"kind": "rollback", "restores": current.version.tag, "reason": reason})

    def push(self) -> None:
        """Send the head's files to the DVC remote, if one is configured."""
        if self.dvc.remote_url() is not None:
            self.dvc.push()

    def _seal(self, tag: str, parent: str | None, meta: dict[str, Any]) -> Version:
        """dvc add, git commit (metadata in the message), tag, clear the journal."""
        self.dvc.add([MODEL, FACTORS])
        crash_point(DVC_ADDED)
        meta = {"tag": tag, "parent": parent, **meta, "model_md5": dvcrepo.out_md5((self.root / MODEL_DVC).read_text(encoding="utf-8"))}
        git(self.root, "add", "-A")
        git(self.root, "commit", "-q", "--allow-empty", "-m", _message(meta))
        crash_point(GIT_COMMITTED)
        git(self.root, "tag", tag)
        crash_point(TAGGED)
        journal.finish(self.root)
        return self.version(tag)

    def _check_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        known = set(self.tensor_names())
        unknown = sorted(set(tensors) - known)
        if unknown:
            raise StoreError(f"the model has no tensors named {', '.join(unknown)}; nothing was changed")
        for name, tensor in tensors.items():
            shape, dtype = tensor_layout(self.model_dir, name)
            if (tuple(tensor.shape), dtype_code(tensor)) != (shape, dtype):
                raise StoreError(
                    f"tensor {name}: new value is {tuple(tensor.shape)} {dtype_code(tensor)}, the model's is "
                    f"{shape} {dtype}; nothing was changed")

    def _write_shares(self, tag: str, shares: tuple[StoredShare, ...]) -> None:
        if shares:
            write_shares(self.factors_path(tag), shares)

    def copy_model(self, tag: str, dest: Path) -> Version:
        """Version ``tag``'s model/ folder (weights, and a routed memory's chunks) copied into ``dest``
        from the DVC cache (fetched from the remote if it lacks them); the workspace is untouched."""
        target = self.version(tag)
        self._ensure_objects(target)
        self.dvc.copy_folder(target.model_md5, dest)
        return target

    def _ensure_objects(self, target: Version) -> None:
        """Fail before touching anything if ``target``'s files are in neither cache nor remote:
        DVC deletes the whole folder when a checkout lacks an object."""
        missing = self.dvc.missing_objects(target.model_md5)
        if missing and self.dvc.remote_url() is not None:
            self.dvc.fetch(target.sha, MODEL_DVC)
            missing = self.dvc.missing_objects(target.model_md5)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise MissingObjectsError(
                f"{target.tag} cannot be restored: the DVC cache of {self.root} lacks {shown}, and no "
                "configured remote has them. Restore .dvc/cache from a backup or set store.remote. Nothing was changed.")

    # -- recovery -----------------------------------------------------------------------------

    def recover(self) -> Recovery:
        """Finish or undo a commit that a crash interrupted, so the store is exactly one version.

        If git already holds the commit, the version exists: tag it if needed. Otherwise
        nothing of it is in git: restore the .dvc files from HEAD and the workspace from them.
        """
        intent = journal.pending(self.root)
        if intent is None:
            return Recovery("none")
        removed = [str(p.relative_to(self.root)) for p in _remove_stale_git_locks(self.root)]
        head = self._log("-1", "HEAD")
        if head and head[0].tag == intent.tag:
            if not git_ok(self.root, "rev-parse", "--verify", "-q", f"refs/tags/{intent.tag}"):
                git(self.root, "tag", intent.tag)
            action = "completed"
        elif git(self.root, "rev-parse", "HEAD").strip() == intent.parent_sha:
            git(self.root, "reset", "-q", "HEAD")  # unstage whatever the interrupted commit staged
            git(self.root, "checkout", "HEAD", "--", MODEL_DVC, FACTORS_DVC)
            removed += [str(p.relative_to(self.root)) for p in remove_partials(self.root / MODEL)]
            removed += [str(p.relative_to(self.root)) for p in remove_partials(self.root / FACTORS)]
            self.dvc.checkout([MODEL, FACTORS])
            action = "undone"
        else:
            raise StoreError(
                f"{self.root}: an interrupted commit of {intent.tag} on {intent.parent_sha[:12]} does not match "
                f"HEAD {git(self.root, 'rev-parse', 'HEAD').strip()[:12]}; inspect the store by hand")
        journal.finish(self.root)
        self.require_clean()
        return Recovery(action, intent.tag, tuple(removed))


def write_shares(path: Path, shares: Sequence[StoredShare], metadata: dict[str, str] | None = None,
                 common: dict[str, torch.Tensor] | None = None) -> None:
    """Several shares in one safetensors file (one write and one fsync, however many corrections;
    gzip-compressed if the name ends in .gz): share i's tensors are named ``i/<tensor>/<part>``,
    tensors common to all of them ``common/<name>``, and the metadata lists each share's corrections."""
    tensors = {f"{i}/{key}": t for i, share in enumerate(shares) for key, t in share.tensors.items()}
    tensors.update({f"{COMMON}/{name}": t for name, t in (common or {}).items()})
    owners = json.dumps([list(share.correction_ids) for share in shares])
    write_tensor_file(path, tensors, metadata={**(metadata or {}), "shares": owners})


def read_shares(path: Path) -> tuple[list[StoredShare], dict[str, str]]:
    """The shares of a file written by :func:`write_shares`, and its metadata."""
    chunk = read_memory_chunk(path)
    return list(chunk.shares), chunk.metadata


def read_memory_chunk(path: Path) -> MemoryChunk:
    """A file written by :func:`write_shares`: its shares, common tensors and metadata."""
    tensors, metadata = read_tensor_file_with_metadata(path)
    owners = json.loads(metadata["shares"])
    grouped: list[dict[str, torch.Tensor]] = [{} for _ in owners]
    common: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        index, name = key.split("/", 1)
        if index == COMMON:
            common[name] = tensor
        else:
            grouped[int(index)][name] = tensor
    shares = tuple(StoredShare(tuple(ids), mine) for ids, mine in zip(owners, grouped))
    return MemoryChunk(shares, common, metadata)


COMMON = "common"


def _one_line(text: str) -> str:
    """``text`` for one line of a commit message: each character that is not printable (a newline, a
    control character, a line separator) as its JSON escape, so no text adds a line to the message."""
    return "".join(char if char.isprintable() else json.dumps(char)[1:-1] for char in text)


def _message(meta: dict[str, Any]) -> str:
    """A commit message a person can read, ending in the JSON line mendd reads back."""
    tag, kind = meta["tag"], meta["kind"]
    corrections = [_one_line(cid) for cid in meta.get("corrections") or []]
    run_id, reason = _one_line(meta.get("run_id") or ""), _one_line(meta.get("reason") or "")
    run = f" (MLflow run {run_id})" if run_id else ""
    subject = {
        "base": f"{tag}: {reason}",
        "edit": f"{tag}: apply {len(corrections)} correction{'s' if len(corrections) != 1 else ''}{run}",
        "rollback": f"{tag}: roll back to {meta.get('restores')}",
        "revert": f"{tag}: revert {', '.join(corrections)}{run}",
    }[kind]
    body = []
    if corrections:
        body.append("Corrections: " + ", ".join(corrections))
    if run_id:
        body.append(f"MLflow run: {run_id}")
    if reason and kind != "base":
        body.append(f"Reason: {reason}")
    # JSON escapes every control character but DEL
    trailer = META_PREFIX + json.dumps(meta, sort_keys=True).replace("\x7f", "\\u007f")
    return "\n\n".join([subject, "\n".join(body), trailer]).replace("\n\n\n", "\n\n")


_Tag = Annotated[str, StringConstraints(pattern=r"^v[0-9]{4,}$")]  # pydantic's Rust regex: `$` ends the text


class _Metadata(BaseModel):
    """A version's metadata as its message carries it, checked strictly: anyone can commit to the store."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    tag: _Tag
    parent: _Tag | None = None
    kind: VersionKind
    corrections: list[str] | None = None
    run_id: str | None = None
    restores: _Tag | None = None
    reason: str = ""
    figures: dict[str, float] | None = None
    model_md5: str


def _metadata(message: str) -> dict[str, Any] | None:
    """The metadata on the message's last line; None when that is no metadata line (a commit that
    is no version). Raises ValueError when it is one but not valid. Only the last line counts:
    nothing in the lines above it can pass for it."""
    last = message.rstrip("\n").rpartition("\n")[2]
    if not last.startswith(META_PREFIX):
        return None
    try:
        meta = json.loads(last[len(META_PREFIX):])
    except (ValueError, RecursionError) as error:  # ValueError: not JSON, or an integer of over 4,300 digits
        raise ValueError(f"not readable JSON: {type(error).__name__}") from None
    try:
        _Metadata.model_validate(meta)
    except ValidationError as error:
        detail = error.errors()[0]
        raise ValueError(f"{'.'.join(map(str, detail['loc'])) or 'the line'}: {detail['msg']}") from None
    return meta


def _version(sha: str, date: str, meta: dict[str, Any]) -> Version:
    return Version(
        tag=meta["tag"], sha=sha, parent=meta.get("parent"), kind=meta["kind"], created_at=datetime.fromisoformat(date),
        corrections=tuple(meta.get("corrections") or ()), run_id=meta.get("run_id"),
        restores=meta.get("restores"), reason=meta.get("reason", ""), figures=dict(meta.get("figures") or {}),
        model_md5=meta["model_md5"],
    )


def _remove_stale_git_locks(root: Path) -> list[Path]:
    """Lock files a killed git left behind; safe to delete only because mendd holds the home lock
    and the journal says its own git command was interrupted."""
    found = list((root / ".git").glob("*.lock")) + list((root / ".git" / "refs").rglob("*.lock"))
    for path in found:
        path.unlink()
    return found
