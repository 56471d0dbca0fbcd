"""The ledger's tables (SQLAlchemy 2.x ORM). Every change here needs an Alembic migration in
store/migrations/versions/; a test compares the migrated database with these classes."""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, DateTime, Enum, ForeignKey, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


class CorrectionStatus(str, enum.Enum):
    pending = "pending"
    applied = "applied"
    rejected = "rejected"
    held = "held"
    quarantined = "quarantined"
    superseded = "superseded"
    rolled_back = "rolled_back"


class UtcDateTime(TypeDecorator):
    """Aware UTC datetimes on every backend: SQLite keeps no time zone, so one is put back on read."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("the ledger stores aware datetimes only")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UtcDateTime, dict[str, Any]: JSON, list[Any]: JSON}


class FeedRow(Base):
    __tablename__ = "feeds"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    # Where the feed was read up to (a byte offset, an HTTP ETag...): the feed's own format.
    cursor: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime]


class CorrectionRow(Base):
    __tablename__ = "corrections"
    __table_args__ = (
        UniqueConstraint("feed_id", "external_id", name="uq_corrections_feed_external_id"),
        Index("ix_corrections_status_received", "status", "received_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    feed_id: Mapped[int] = mapped_column(ForeignKey("feeds.id"))
    feed: Mapped[FeedRow] = relationship(lazy="joined")
    external_id: Mapped[str] = mapped_column(String(300), index=True)
    content_hash: Mapped[str] = mapped_column(String(64), unique=True)
    payload: Mapped[dict[str, Any]]
    status: Mapped[CorrectionStatus] = mapped_column(
        Enum(CorrectionStatus, native_enum=False, length=16, create_constraint=True, name="correction_status")
    )
    version: Mapped[str | None] = mapped_column(String(16))
    run_id: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class CycleRow(Base):
    __tablename__ = "cycles"

    id: Mapped[int] = mapped_column(primary_key=True)
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    outcome: Mapped[str | None] = mapped_column(String(32))
    version: Mapped[str | None] = mapped_column(String(16))
    run_ids: Mapped[list[Any]]
    detail: Mapped[str | None] = mapped_column(Text)


class VersionRow(Base):
    __tablename__ = "versions"

    tag: Mapped[str] = mapped_column(String(16), primary_key=True)
    sha: Mapped[str] = mapped_column(String(40))
    parent: Mapped[str | None] = mapped_column(String(16))
    kind: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime]
    corrections: Mapped[list[Any]]
    run_id: Mapped[str | None] = mapped_column(String(64))
    restores: Mapped[str | None] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    figures: Mapped[dict[str, Any]]
    model_md5: Mapped[str] = mapped_column(String(64))


class EventRow(Base):
    """Things that happened to the store outside a cycle: recovery at start, an operator's checkout."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(32))
    version: Mapped[str | None] = mapped_column(String(16))
    detail: Mapped[str] = mapped_column(Text)
