"""Alembic migrations of the ledger; run by store.ledger when a ledger is opened."""
