"""The first ledger schema: feeds, corrections, cycles, versions, events.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""
from alembic import op
import sqlalchemy as sa

from store.ledger_schema import UtcDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

STATUSES = ("pending", "applied", "rejected", "held", "quarantined", "superseded", "rolled_back")


def upgrade() -> None:
    op.create_table(
        "feeds",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("cursor", sa.Text(), nullable=True),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
    )
    op.create_table(
        "corrections",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("feed_id", sa.Integer(), sa.ForeignKey("feeds.id"), nullable=False),
        sa.Column("external_id", sa.String(300), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("status", sa.Enum(*STATUSES, native_enum=False, length=16, create_constraint=True,
                                    name="correction_status"), nullable=False),
        sa.Column("version", sa.String(16), nullable=True),
        sa.Column("run_id", sa.String(64), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("received_at", UtcDateTime(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.UniqueConstraint("feed_id", "external_id", name="uq_corrections_feed_external_id"),
    )
    op.create_index("ix_corrections_external_id", "corrections", ["external_id"])
    op.create_index("ix_corrections_status_received", "corrections", ["status", "received_at"])
    op.create_table(
        "cycles",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("started_at", UtcDateTime(), nullable=False),
        sa.Column("finished_at", UtcDateTime(), nullable=True),
        sa.Column("outcome", sa.String(32), nullable=True),
        sa.Column("version", sa.String(16), nullable=True),
        sa.Column("run_ids", sa.JSON(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
    )
    op.create_table(
        "versions",
        sa.Column("tag", sa.String(16), primary_key=True),
        sa.Column("sha", sa.String(40), nullable=False),
        sa.Column("parent", sa.String(16), nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("corrections", sa.JSON(), nullable=False),
        sa.Column("run_id", sa.String(64), nullable=True),
        sa.Column("restores", sa.String(16), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("figures", sa.JSON(), nullable=False),
        sa.Column("model_md5", sa.String(64), nullable=False),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("at", UtcDateTime(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("version", sa.String(16), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
    )


def downgrade() -> None:
    for table in ("events", "versions", "cycles", "corrections", "feeds"):
        op.drop_table(table)
