"""Alembic environment: the ledger hands over its open connection, so no URL is configured here."""

from alembic import context

from store.ledger_schema import Base

connection = context.config.attributes["connection"]
# Batch mode lets later migrations alter columns on SQLite, which has no ALTER COLUMN.
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
