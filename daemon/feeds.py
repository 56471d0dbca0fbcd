"""Feeds: where corrections come from. Each pull reads only what is new, stores every record in
the ledger (good ones pending, bad ones quarantined with their reason), then moves the cursor.

- file: a JSON or JSONL file; the cursor is the last position stored and the file's identity: its
  inode and a hash of the first and last 4 KiB it has seen, so a file replaced, truncated or
  rewritten in place (shorter, as long, or grown past the cursor) is read from the start, and the
  ledger recognises records it already has. JSONL is read on from the cursor, whole lines only, at
  most max_bytes and max_records a pull (the rest is the next pull's); a line longer than max_bytes
  is quarantined and passed over. A last line without its newline is read when it is a whole JSON
  value (a producer may end the file without one), and is not stored again when the newline
  follows; otherwise it is a producer mid-write and waits for the rest. A JSON array is parsed
  whole, at most max_records of its records stored a pull, and read again whenever it changes
  (write it elsewhere and rename it in: a half-written one is quarantined).
- dir: a drop folder; each new file is ingested, then moved to done/ (or quarantine/ when nothing
  in it could be read).
- http: GET of a JSON/JSONL URL with If-None-Match and `since=<cursor>`; the server names the next
  cursor in the X-Mendd-Cursor header (without one, ETag and the ledger's deduplication keep
  records from being stored twice). TLS is verified; a timeout and a size cap bound each pull.

A cursor moves only after the records before it are in the ledger, so a crash re-reads, never skips.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO
from urllib.parse import parse_qsl, quote, urlsplit

import requests

from daemon.config import FeedConfig
from daemon.home import Home
from editors.formats import FormatError, content_id, is_json_array, read_stream, to_record
from editors.types import Correction
from store.crash import FEED_STORED, crash_point
from store.ledger import Ledger, content_hash

CURSOR_EVERY = 1000  # records between cursor saves on a long file
MARK_BYTES = 4096  # bytes at each end of what a file cursor has seen, hashed to notice a rewrite
INGEST_CHUNK = 500  # corrections stored per ledger transaction
RAW_KEPT = 16_384  # characters of an unusable record kept with its quarantine (its reason names the rest)
USER_AGENT = "mendd-feed/1"


class FeedError(Exception):
    """A feed could not be pulled this time (unreachable, too large, unreadable); it is retried."""


@dataclass
class IntakeReport:
    feed: str
    received: int = 0  # new corrections stored as pending
    duplicates: int = 0  # already in the ledger
    quarantined: int = 0  # bad records stored as quarantined
    reasons: list[str] = field(default_factory=list)


def ingest(ledger: Ledger, home: Home, feed: str, items: Iterable[tuple[str, Correction | FormatError]],
           report: IntakeReport | None = None) -> IntakeReport:
    """Store each (where, item): a correction as pending, an error as quarantined (and in the
    quarantine file). Good records are stored in chunks, so memory and commits stay bounded."""
    report = report or IntakeReport(feed)
    chunk: list[tuple[str, Correction]] = []
    for where, item in items:
        if isinstance(item, FormatError):
            raw = {"raw": item.raw[:RAW_KEPT]} if item.raw is not None else {}
            _quarantine(ledger, home, feed, where, item, {"where": where, "error": str(item), **raw}, report)
            continue
        chunk.append((where, item))
        if len(chunk) >= INGEST_CHUNK:
            _store(ledger, home, feed, chunk, report)
            chunk = []
    _store(ledger, home, feed, chunk, report)
    return report


def enqueue(ledger: Ledger, corrections: list[Correction], feed: str) -> list[bool]:
    """Store corrections as pending, once each (a repeat is recognised); whether each was new."""
    return ledger.receive_many(feed, [(c.id, to_record(c), c.received_at) for c in corrections])


def located(label: str, handle: BinaryIO, fmt: str = "auto", source: str = "manual") -> Iterator[tuple[str, Correction | FormatError]]:
    """Each record of a stream with where it came from (`<label> #<position>`), as ingest takes them."""
    for position, item in read_stream(handle, fmt, source):
        yield f"{label} #{position}", item


def _store(ledger: Ledger, home: Home, feed: str, chunk: list[tuple[str, Correction]], report: IntakeReport) -> None:
    """Store a chunk's corrections as pending, except those under an id another correction already
    has: quarantined, with the record, so the producer can send it again under a new id."""
    if not chunk:
        return
    records = [to_record(correction) for _, correction in chunk]
    taken = ledger.ids_taken(feed, [(c.id, content_hash(r)) for (_, c), r in zip(chunk, records)])
    for position, holder in taken.items():
        where, correction = chunk[position]
        # labelled "#<position>" as the format's own errors are (`where` is "<source> #<position>")
        error = FormatError(where.rsplit(" ", 1)[-1], "id", f"{correction.id!r} already names another correction (from feed {holder!r}); "
                                         "send a different fact under a new id")
        _quarantine(ledger, home, feed, where, error,
                    {"where": where, "error": str(error), "record": {"id": correction.id, **records[position]}}, report)
    new = enqueue(ledger, [c for position, (_, c) in enumerate(chunk) if position not in taken], feed)
    crash_point(FEED_STORED)
    report.received += sum(new)
    report.duplicates += len(new) - sum(new)


def _quarantine(ledger: Ledger, home: Home, feed: str, where: str, error: FormatError, payload: dict,
                report: IntakeReport) -> None:
    """Store an unusable record as quarantined with its reason, once: its position, its problem and
    its content name it, so the same record read again is recognised, and another bad record at the
    same place (the next POST's first line) is stored too."""
    _, new = ledger.quarantine(feed, f"{where} [{content_id(str(error), error.raw or '')[:8]}]", payload, str(error))
    if new:
        report.quarantined += 1
        report.reasons.append(f"{where}: {error}")
        quarantine_line(home, feed, where, str(error))
    else:
        report.duplicates += 1


def quarantine_line(home: Home, feed: str, where: str, reason: str) -> None:
    """One line in the home's quarantine file: what an operator reads of every record or pull a feed could not use."""
    home.state_dir.mkdir(parents=True, exist_ok=True)
    line = {"at": datetime.now(timezone.utc).isoformat(), "feed": feed, "where": where, "reason": reason}
    with open(home.quarantine_path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\n")


def pull(feed: FeedConfig, ledger: Ledger, home: Home) -> IntakeReport:
    puller = {"file": pull_file, "dir": pull_dir, "http": pull_http}[feed.kind]
    return puller(feed, ledger, home)


# -- file ---------------------------------------------------------------------------------------

def pull_file(feed: FeedConfig, ledger: Ledger, home: Home) -> IntakeReport:
    try:
        handle = open(feed.path, "rb")
    except FileNotFoundError:
        raise FeedError(f"feed {feed.name}: {feed.path} does not exist") from None
    with handle:
        stat = os.fstat(handle.fileno())  # of the file opened, even if the path is replaced meanwhile
        array = is_json_array(handle)
        cursor = _resumed(json.loads(ledger.cursor(feed.name) or "{}"), stat, handle, grows=not array)
        if cursor.get("size") == stat.st_size and cursor.get("mtime_ns") == stat.st_mtime_ns:
            return IntakeReport(feed.name)  # unchanged since the last pull
        # JSONL is read from where the last pull ended (`offset`, `line` lines in); `position` is the
        # last line stored, which a crash part-way through a pull leaves ahead of `line`.
        offset, first, position = cursor.get("offset", 0), cursor.get("line", 0), cursor.get("position", 0)
        reading = _Array(feed, handle, stat.st_size) if array else _Window(feed, handle, offset, first, stat.st_size)
        start = {"inode": stat.st_ino, "offset": offset, "line": first, "seen": cursor.get("seen", 0),
                 "mark": cursor.get("mark") or _mark(handle, 0)}
        report = IntakeReport(feed.name)
        for batch in _batches(reading.records(feed.format, f"feed:{feed.name}", position), CURSOR_EVERY):
            ingest(ledger, home, feed.name, ((f"{feed.path.name} #{pos}", item) for pos, item in batch), report)
            position = batch[-1][0]
            ledger.set_cursor(feed.name, json.dumps({**start, "position": position}))
        offset, first, seen = reading.end()
        done = {"inode": stat.st_ino, "offset": offset, "line": first, "seen": seen, "mark": _mark(handle, seen),
                "position": position}
        if reading.finished:  # else the rest is the next pull's
            done.update(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    ledger.set_cursor(feed.name, json.dumps(done))
    return report


def _resumed(cursor: dict, stat: os.stat_result, handle: BinaryIO, grows: bool) -> dict:
    """The cursor, if the file is still the one it read: the same inode, and the bytes it has seen
    unchanged at both ends (grown after them for JSONL, not at all for a JSON array, which is only
    ever rewritten). Else none, so the file is read from its start and the ledger recognises what it
    already has: a file replaced, truncated, or rewritten in place (shorter, as long, or longer)."""
    seen = cursor.get("seen", 0)
    same = cursor.get("inode") == stat.st_ino and (stat.st_size >= seen if grows else stat.st_size == seen)
    return cursor if same and cursor.get("mark") == _mark(handle, seen) else {}


def _mark(handle: BinaryIO, end: int) -> str:
    """A hash of the first and the last MARK_BYTES before `end`: a rewrite changes them (unless it
    changes only the middle of a large file), and the cost does not grow with the file."""
    digest = hashlib.sha256()
    for at in (0, max(0, end - MARK_BYTES)):
        handle.seek(at)
        digest.update(handle.read(min(MARK_BYTES, end - at)))
    return digest.hexdigest()[:32]


def _whole_json(text: bytes) -> bool:
    try:
        json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError):
        return False
    return True


class _Window:
    """The JSONL lines one pull reads from `offset`: whole lines of the file as it was when the pull
    began, at most max_bytes and max_records of them.

    A last line without its newline is read only when it is a whole JSON value (its producer ends
    the file without one); the cursor stays before it, and the line is not stored again when its
    newline follows. One that is not (a producer mid-write) waits for the rest. A line longer than
    max_bytes is passed over, once its newline is there, as its FormatError."""

    def __init__(self, feed: FeedConfig, handle: BinaryIO, offset: int, line: int, size: int):
        self.feed, self.handle, self.offset, self.line, self.size = feed, handle, offset, line, size
        self.read = self.lines = self.tail = 0  # bytes and lines read whole; bytes of a last line read without newline
        self.finished = False  # nothing left before the end of the file: the next pull waits for it to change
        self.skipped: FormatError | None = None

    def records(self, fmt: str, source: str, after: int) -> Iterator[tuple[int, Correction | FormatError]]:
        yield from read_stream(self, fmt, source, after, first_line=self.line + 1)
        if self.skipped:
            yield self.line + 1, self.skipped

    def end(self) -> tuple[int, int, int]:
        """(offset, line) where the next pull reads on, and the bytes seen (read, or stored)."""
        return self.offset + self.read, self.line + self.lines, self.offset + self.read + self.tail

    def __iter__(self) -> Iterator[bytes]:
        self.handle.seek(self.offset)
        rest = self.size - self.offset
        budget = min(rest, self.feed.max_bytes)
        while self.read < budget and self.lines < self.feed.max_records:
            text = self.handle.readline(budget - self.read)
            if not text.endswith(b"\n"):
                yield from self._unterminated(text, rest)
                return
            self.read += len(text)
            self.lines += 1
            yield text
        self.finished = self.read == rest

    def _unterminated(self, text: bytes, rest: int) -> Iterator[bytes]:
        if self.read + len(text) == rest:  # the file's last line, without its newline so far
            self.finished = True
            if _whole_json(text):
                self.tail = len(text)
                yield text
        elif text and self.lines == 0:  # cut by max_bytes alone
            self._skip(len(text), rest)
        # else cut by max_bytes after other lines (the next pull's first), or the file shrank meanwhile

    def _skip(self, length: int, rest: int) -> None:
        """Pass over a line longer than max_bytes, reading on to its newline in chunks."""
        while True:
            chunk = self.handle.read(min(1 << 16, rest - length))
            if not chunk:  # the file's last line, no newline yet: it waits
                self.finished = True
                return
            if (newline := chunk.find(b"\n")) >= 0:
                break
            length += len(chunk)
        self.read, self.lines = length + newline + 1, 1
        self.finished = self.read == rest
        self.skipped = FormatError(f"line {self.line + 1}", "(line)", f"{self.read} bytes at byte {self.offset} of "
                                   f"{self.feed.path}, longer than max_bytes {self.feed.max_bytes}: passed over")


class _Array:
    """A JSON array file: parsed whole (so at most max_bytes), of which a pull stores at most
    max_records records after the cursor's position."""

    def __init__(self, feed: FeedConfig, handle: BinaryIO, size: int):
        if size > feed.max_bytes:
            raise FeedError(f"feed {feed.name}: {feed.path} is a JSON array of {size} bytes, over max_bytes {feed.max_bytes}")
        self.feed, self.handle, self.size = feed, handle, size
        self.finished = False

    def records(self, fmt: str, source: str, after: int) -> Iterator[tuple[int, Correction | FormatError]]:
        self.handle.seek(0)
        for position, item in read_stream(self.handle, fmt, source, after):
            if position > after + self.feed.max_records:  # positions are the array's indexes
                return
            yield position, item
        self.finished = True

    def end(self) -> tuple[int, int, int]:
        return self.size, 0, self.size


def _batches(items: Iterator[tuple[int, object]], size: int) -> Iterator[list]:
    """(position, item) in lists of about `size`, never splitting a position's items (an MQuAKE
    case's corrections), as the cursor saved after a list passes its last position."""
    batch: list = []
    for item in items:
        if len(batch) >= size and item[0] != batch[-1][0]:
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


# -- dir ----------------------------------------------------------------------------------------

def pull_dir(feed: FeedConfig, ledger: Ledger, home: Home) -> IntakeReport:
    folder = feed.path
    if not folder.is_dir():
        raise FeedError(f"feed {feed.name}: {folder} is not a folder")
    report = IntakeReport(feed.name)
    # Dot-files and *.tmp are being written by someone: drop a file by writing it elsewhere, then renaming.
    arrivals = sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                       and not p.name.endswith((".tmp", ".part"))), key=lambda p: (p.stat().st_mtime, p.name))
    for path in arrivals:
        before = (report.received, report.duplicates)
        if path.stat().st_size > feed.max_bytes:
            items: list = [(path.name, FormatError("(file)", "(size)", f"{path.stat().st_size} bytes, over max_bytes {feed.max_bytes}"))]
        else:
            with open(path, "rb") as handle:
                items = list(located(path.name, handle, feed.format, f"feed:{feed.name}"))
        ingest(ledger, home, feed.name, items, report)
        usable = (report.received, report.duplicates) != before
        _move(path, folder / ("done" if usable or not items else "quarantine"))
    return report


def _move(path: Path, target_dir: Path) -> None:
    target_dir.mkdir(exist_ok=True)
    target = target_dir / path.name
    if target.exists():
        target = target_dir / f"{time.strftime('%Y%m%dT%H%M%S')}-{path.name}"
    shutil.move(str(path), str(target))


# -- http ---------------------------------------------------------------------------------------

def pull_http(feed: FeedConfig, ledger: Ledger, home: Home) -> IntakeReport:
    cursor = json.loads(ledger.cursor(feed.name) or "{}")
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json, application/x-ndjson"}
    if cursor.get("etag"):
        headers["If-None-Match"] = cursor["etag"]
    params = {"since": cursor["since"]} if cursor.get("since") else None
    try:
        with requests.get(feed.url, headers=headers, params=params, timeout=feed.timeout_s, stream=True, verify=True) as response:
            if response.status_code == 304:
                return IntakeReport(feed.name)
            if response.status_code != 200:
                raise FeedError(f"feed {feed.name}: {redacted(feed.url)} answered HTTP {response.status_code}")
            body = _capped_body(response, feed)
            etag, next_since = response.headers.get("ETag"), response.headers.get("X-Mendd-Cursor")
    except requests.RequestException as error:
        raise FeedError(redacted(f"feed {feed.name}: {feed.url} unreachable: {type(error).__name__}: {error}",
                                 secrets_of(feed.url))) from None
    report = IntakeReport(feed.name)
    ingest(ledger, home, feed.name, located(feed.name, io.BytesIO(body), feed.format, f"feed:{feed.name}"), report)
    ledger.set_cursor(feed.name, json.dumps({"etag": etag, "since": next_since or cursor.get("since")}))
    return report


SECRET_KEYS = re.compile(r"token|key|secret|pass|auth|sig|credential|session", re.IGNORECASE)


def secrets_of(url: str) -> list[str]:
    """The parts of a feed URL that are credentials: the userinfo's password and the values of query
    parameters named like one (token, api_key, signature, ...)."""
    parts = urlsplit(url)
    query = [value for name, value in parse_qsl(parts.query) if SECRET_KEYS.search(name)]
    return [s for s in [parts.password, *query] if s]


def redacted(text: str, secrets: list[str] | None = None) -> str:
    """`text` (a URL, or a message about one) with each secret of the URL shown as ***: health,
    logs and MLflow see where a feed is, never its credentials."""
    for secret in sorted(secrets if secrets is not None else secrets_of(text), key=len, reverse=True):
        text = text.replace(secret, "***").replace(quote(secret, safe=""), "***")
    return text


def _capped_body(response: requests.Response, feed: FeedConfig) -> bytes:
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > feed.max_bytes:
        raise FeedError(f"feed {feed.name}: response of {declared} bytes is over max_bytes {feed.max_bytes}")
    chunks, total = [], 0
    for chunk in response.iter_content(1 << 16):
        total += len(chunk)
        if total > feed.max_bytes:
            raise FeedError(f"feed {feed.name}: response is over max_bytes {feed.max_bytes}; nothing was read")
        chunks.append(chunk)
    return b"".join(chunks)
