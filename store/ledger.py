"""The ledger: what mendd received, decided and committed, in a SQL database.

SQLite (WAL mode, so the service and a CLI command can read while the other writes) by default;
any SQLAlchemy URL, such as ``postgresql+psycopg://...``, works unchanged. The schema is created
and upgraded by the Alembic migrations in store/migrations/ when a process first opens a ledger on
a database.

The version store is the truth about weights; the ledger agrees with it: ``record_version`` is
idempotent and recovery replays it for every version the ledger has not seen.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from store.errors import UnknownCorrectionError
from store.ledger_schema import CorrectionRow, CorrectionStatus, CycleRow, EventRow, FeedRow, VersionRow
from store.versions import Version

MIGRATIONS = Path(__file__).with_name("migrations")
# Databases this process has brought to the newest schema: an Alembic run costs far more than the
# requests and pulls that open ledgers, and the schema does not change under a running process.
upgraded: set[str] = set()
_upgrading = threading.Lock()
RESUBMITTABLE = (CorrectionStatus.rolled_back, CorrectionStatus.rejected)


@dataclass(frozen=True)
class LedgerCorrection:
    key: int
    feed: str
    external_id: str
    payload: dict[str, Any]
    status: CorrectionStatus
    version: str | None
    run_id: str | None
    reason: str | None
    received_at: datetime


@dataclass(frozen=True)
class Cycle:
    id: int
    started_at: datetime
    finished_at: datetime | None
    outcome: str | None
    version: str | None
    run_ids: list[str]
    detail: str | None


@dataclass(frozen=True)
class Event:
    at: datetime
    kind: str
    version: str | None
    detail: str


def now() -> datetime:
    return datetime.now(timezone.utc)


def content_hash(payload: dict[str, Any]) -> str:
    """The same content always hashes the same: keys sorted, no whitespace."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def migrate(engine: Engine) -> None:
    """Bring the database to the newest schema (creating it if empty)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def upgrade_once(url: str, engine: Engine) -> None:
    """Migrate the database at `url`, unless this process already has."""
    with _upgrading:
        if url not in upgraded:
            migrate(engine)
            upgraded.add(url)


class Ledger:
    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        upgrade_once(url, self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    # -- corrections --------------------------------------------------------------------------

    def receive(self, feed: str, external_id: str, payload: dict[str, Any],
                received_at: datetime | None = None, *, resubmit: bool = False) -> tuple[LedgerCorrection, bool]:
        """Store a correction as pending, unless it is already here: by (feed, id), or by content.

        ``payload`` is the correction's content without its id or arrival time, so the same fact
        sent twice hashes the same. Returns the stored row and whether it is new. A feed read
        again never revives a correction; an operator's ``resubmit`` makes a rolled-back or
        rejected one pending again (still one row).
        """
        digest = content_hash(payload)
        try:
            with self._transaction() as session:
                existing = _existing(session, feed, external_id, digest)
                if existing is not None:
                    if resubmit and existing.status in RESUBMITTABLE:
                        _set(existing, CorrectionStatus.pending, version=None, run_id=None,
                             reason=f"resubmitted after {existing.status.value}")
                    return _correction(existing), False
                row = CorrectionRow(
                    feed_id=_feed(session, feed).id, external_id=external_id, content_hash=digest, payload=payload,
                    status=CorrectionStatus.pending, received_at=received_at or now(), updated_at=now())
                session.add(row)
                session.flush()
                return _correction(row), True
        except IntegrityError:
            # Another process stored the same correction between our look-up and insert.
            with self._transaction() as session:
                return _correction(_existing(session, feed, external_id, digest)), False

    def receive_many(self, feed: str, records: list[tuple[str, dict[str, Any], datetime | None]]) -> list[bool]:
        """`receive` for many records in one transaction, with two look-ups for the whole chunk (a
        long feed file costs a few queries per chunk, not per record); whether each was new. Falls
        back to one by one if another process stores the same record meanwhile."""
        digests = [content_hash(payload) for _, payload, _ in records]
        try:
            with self._transaction() as session:
                feed_row = _feed(session, feed)
                ids = {external_id for external_id, _, _ in records}
                seen_ids = set(session.scalars(select(CorrectionRow.external_id).where(
                    CorrectionRow.feed_id == feed_row.id, CorrectionRow.external_id.in_(ids))))
                seen_digests = set(session.scalars(select(CorrectionRow.content_hash).where(
                    CorrectionRow.content_hash.in_(set(digests)))))
                new = []
                for (external_id, payload, received_at), digest in zip(records, digests):
                    if external_id in seen_ids or digest in seen_digests:
                        new.append(False)
                        continue
                    seen_ids.add(external_id)
                    seen_digests.add(digest)
                    session.add(CorrectionRow(
                        feed_id=feed_row.id, external_id=external_id, content_hash=digest, payload=payload,
                        status=CorrectionStatus.pending, received_at=received_at or now(), updated_at=now()))
                    new.append(True)
                return new
        except IntegrityError:
            return [self.receive(feed, external_id, payload, received_at)[1] for external_id, payload, received_at in records]

    def ids_taken(self, feed: str, records: list[tuple[str, str]]) -> dict[int, str]:
        """Of (id, content hash) pairs about to be received from `feed`, in order: the positions whose
        id already names a correction of other content (stored, from any feed, or earlier in
        `records`), each with the feed that holds it. Versions, the memory and the review name
        corrections by id alone, so a second fact under a taken id would be indistinguishable from
        the first. A record whose content is already stored is not listed: it is a repeat."""
        ids = sorted({external_id for external_id, _ in records})
        holders: dict[str, tuple[str, str]] = {}  # id -> (content hash, feed)
        with self._transaction() as session:
            for part in _parts(ids):
                query = (select(CorrectionRow.external_id, CorrectionRow.content_hash, FeedRow.name).join(FeedRow)
                         .where(CorrectionRow.external_id.in_(part)))
                for external_id, digest, holder in session.execute(query):
                    holders.setdefault(external_id, (digest, holder))
            stored = set()
            for part in _parts(list({digest for _, digest in records})):
                stored.update(session.scalars(select(CorrectionRow.content_hash).where(CorrectionRow.content_hash.in_(part))))
        taken: dict[int, str] = {}
        for position, (external_id, digest) in enumerate(records):
            if digest in stored:
                continue
            holder = holders.setdefault(external_id, (digest, feed))
            if holder[0] != digest:
                taken[position] = holder[1]
        return taken

    def quarantine(self, feed: str, external_id: str, payload: dict[str, Any], reason: str) -> tuple[LedgerCorrection, bool]:
        """Store a record that cannot be used, already quarantined with its reason (once, like receive)."""
        row, new = self.receive(feed, external_id, payload)
        if new:
            self.mark([row.key], CorrectionStatus.quarantined, reason=reason)
        return self.correction_by_key(row.key), new

    def correction_by_key(self, key: int) -> LedgerCorrection:
        with self._transaction() as session:
            return _correction(session.get_one(CorrectionRow, key))

    def counts(self) -> dict[str, int]:
        """Corrections per status (every status, zeros included)."""
        with self._transaction() as session:
            found = dict(session.execute(
                select(CorrectionRow.status, func.count()).group_by(CorrectionRow.status)).all())
        return {status.value: found.get(status, 0) for status in CorrectionStatus}

    def correction(self, external_id: str) -> LedgerCorrection:
        """The correction with this id; the applied one if several feeds used the same id."""
        with self._transaction() as session:
            rows = session.scalars(select(CorrectionRow).where(CorrectionRow.external_id == external_id)).all()
            if not rows:
                raise UnknownCorrectionError(f"no correction {external_id!r} in the ledger; nothing was changed")
            applied = [row for row in rows if row.status == CorrectionStatus.applied]
            return _correction(applied[0] if applied else rows[0])

    def corrections(self, status: CorrectionStatus | None = None) -> list[LedgerCorrection]:
        """Oldest first."""
        with self._transaction() as session:
            query = select(CorrectionRow).order_by(CorrectionRow.received_at, CorrectionRow.id)
            if status is not None:
                query = query.where(CorrectionRow.status == status)
            return [_correction(row) for row in session.scalars(query)]

    def carried_records(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(external id, feed, record) of each correction the weights carry (applied at some version),
        oldest first: columns only, no row objects, so that a decision reads 10,000 of them cheaply."""
        with self._transaction() as session:
            query = (select(CorrectionRow.external_id, FeedRow.name, CorrectionRow.payload).join(FeedRow)
                     .where(CorrectionRow.status == CorrectionStatus.applied, CorrectionRow.version.is_not(None))
                     .order_by(CorrectionRow.received_at, CorrectionRow.id))
            return [(external_id, feed, payload) for external_id, feed, payload in session.execute(query)]

    def applied_at(self, external_ids: list[str]) -> dict[str, str]:
        """Of these corrections, those whose change the weights carry, with the version that applied each."""
        with self._transaction() as session:
            return {row.external_id: row.version for row in _rows_with_ids(session, external_ids)
                    if row.status == CorrectionStatus.applied and row.version is not None}

    def of_run(self, run_id: str) -> list[LedgerCorrection]:
        """The corrections whose latest decision is MLflow run `run_id`."""
        with self._transaction() as session:
            return [_correction(row) for row in session.scalars(select(CorrectionRow).where(CorrectionRow.run_id == run_id))]

    def pending(self, limit: int) -> list[LedgerCorrection]:
        with self._transaction() as session:
            query = (select(CorrectionRow).where(CorrectionRow.status == CorrectionStatus.pending)
                     .order_by(CorrectionRow.received_at, CorrectionRow.id).limit(limit))
            return [_correction(row) for row in session.scalars(query)]

    def mark(self, keys: list[int], status: CorrectionStatus, *, run_id: str | None = None,
             reason: str | None = None) -> None:
        """A decision about corrections that did not change the weights (rejected, held...)."""
        with self._transaction() as session:
            for row in session.scalars(select(CorrectionRow).where(CorrectionRow.id.in_(keys))):
                _set(row, status, version=row.version, run_id=run_id, reason=reason)

    # -- feeds --------------------------------------------------------------------------------

    def cursor(self, feed: str) -> str | None:
        """A read: a feed not yet seen has no cursor (no row is made for it here)."""
        with self._transaction() as session:
            return session.scalars(select(FeedRow.cursor).where(FeedRow.name == feed)).one_or_none()

    def set_cursor(self, feed: str, cursor: str) -> None:
        with self._transaction() as session:
            row = _feed(session, feed)
            row.cursor, row.updated_at = cursor, now()

    # -- cycles -------------------------------------------------------------------------------

    def start_cycle(self) -> int:
        with self._transaction() as session:
            row = CycleRow(started_at=now(), run_ids=[])
            session.add(row)
            session.flush()
            return row.id

    def finish_cycle(self, cycle_id: int, outcome: str, *, version: str | None = None,
                     run_ids: list[str] | None = None, detail: str | None = None) -> None:
        with self._transaction() as session:
            row = session.get_one(CycleRow, cycle_id)
            row.finished_at, row.outcome, row.version = now(), outcome, version
            row.run_ids, row.detail = list(run_ids or []), detail

    def cycles(self) -> list[Cycle]:
        with self._transaction() as session:
            return [Cycle(r.id, r.started_at, r.finished_at, r.outcome, r.version, list(r.run_ids), r.detail)
                    for r in session.scalars(select(CycleRow).order_by(CycleRow.id))]

    # -- versions -----------------------------------------------------------------------------

    def recorded_tags(self) -> list[str]:
        with self._transaction() as session:
            return list(session.scalars(select(VersionRow.tag).order_by(VersionRow.tag)))

    def record_version(self, version: Version, carried: dict[str, str]) -> None:
        """Record a committed version and make every correction's status agree with its weights:
        those it carries are applied (at the version that applied them), and those applied before
        but no longer carried are rolled back. Doing it twice changes nothing."""
        with self._transaction() as session:
            if session.get(VersionRow, version.tag) is not None:
                return
            session.add(VersionRow(
                tag=version.tag, sha=version.sha, parent=version.parent, kind=version.kind,
                created_at=version.created_at, corrections=list(version.corrections), run_id=version.run_id,
                restores=version.restores, reason=version.reason, figures=version.figures, model_md5=version.model_md5))
            # Only rows whose status changes are loaded: read as two columns, the applied ones cost
            # little however many there are, so a commit's cost stays flat as they grow.
            applied = dict(session.execute(select(CorrectionRow.external_id, CorrectionRow.version)
                                           .where(CorrectionRow.status == CorrectionStatus.applied)).all())
            for row in _rows_with_ids(session, [cid for cid, at in carried.items() if cid not in applied or applied[cid] != at]):
                applied_at = carried[row.external_id]
                if row.status != CorrectionStatus.applied or row.version != applied_at:
                    run_id = version.run_id if applied_at == version.tag else row.run_id
                    _set(row, CorrectionStatus.applied, version=applied_at, run_id=run_id,
                         reason=None if applied_at == version.tag else f"restored by {version.tag}")
            # version None: the model already answered it as asked, so no weights carry it
            dropped = [cid for cid, at in applied.items() if cid not in carried and at is not None]
            for row in _rows_with_ids(session, dropped):
                if row.status == CorrectionStatus.applied and row.version is not None:
                    _set(row, CorrectionStatus.rolled_back, version=row.version, run_id=row.run_id,
                         reason=_removal_reason(version))

    # -- events -------------------------------------------------------------------------------

    def record_event(self, kind: str, detail: str, version: str | None = None) -> None:
        with self._transaction() as session:
            session.add(EventRow(at=now(), kind=kind, version=version, detail=detail))

    def events(self) -> list[Event]:
        with self._transaction() as session:
            return [Event(r.at, r.kind, r.version, r.detail) for r in session.scalars(select(EventRow).order_by(EventRow.id))]


def _feed(session: Session, name: str) -> FeedRow:
    """The feed's row, made on first use. Two threads (a pull and a POST) may both make it: the
    loser's insert, in its own savepoint, hits the unique name and reads the winner's row."""
    found = select(FeedRow).where(FeedRow.name == name)
    row = session.scalars(found).one_or_none()
    if row is not None:
        return row
    try:
        with session.begin_nested():
            row = FeedRow(name=name, updated_at=now())
            session.add(row)
        return row
    except IntegrityError:
        return session.scalars(found).one()


def _existing(session: Session, feed: str, external_id: str, digest: str) -> CorrectionRow | None:
    same_id = (select(CorrectionRow).join(FeedRow)
               .where(FeedRow.name == feed, CorrectionRow.external_id == external_id))
    found = session.scalars(same_id).one_or_none()
    if found is not None:
        return found
    return session.scalars(select(CorrectionRow).where(CorrectionRow.content_hash == digest)).one_or_none()


def _parts(values: list[str], size: int = 500) -> Iterator[list[str]]:
    """`values` in parts small enough for one IN (...): databases limit how many parameters one
    statement may bind."""
    for start in range(0, len(values), size):
        yield values[start:start + size]


def _rows_with_ids(session: Session, external_ids: list[str]) -> list[CorrectionRow]:
    return [row for part in _parts(external_ids)
            for row in session.scalars(select(CorrectionRow).where(CorrectionRow.external_id.in_(part)))]


def _set(row: CorrectionRow, status: CorrectionStatus, *, version: str | None, run_id: str | None,
         reason: str | None) -> None:
    row.status, row.version, row.run_id, row.reason, row.updated_at = status, version, run_id, reason, now()


def _removal_reason(version: Version) -> str:
    if version.kind == "rollback":
        return f"rolled back by {version.tag} (to {version.restores})"
    return f"reverted by {version.tag}"


def _correction(row: CorrectionRow) -> LedgerCorrection:
    return LedgerCorrection(
        key=row.id, feed=row.feed.name, external_id=row.external_id, payload=dict(row.payload),
        status=row.status, version=row.version, run_id=row.run_id, reason=row.reason, received_at=row.received_at)

