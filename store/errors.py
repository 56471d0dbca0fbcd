"""Errors of the version store and the ledger: each message names what is wrong and the fix."""

from __future__ import annotations


class StoreError(Exception):
    """The store cannot do what was asked; nothing was changed unless the message says so."""


class UnknownVersionError(StoreError):
    """A version tag that the store does not have."""


class DirtyStoreError(StoreError):
    """The store holds changes mendd did not make, so it refuses to build on top of them."""


class MissingObjectsError(StoreError):
    """A version's files are not in the DVC cache (nor in the remote)."""


class UnknownCorrectionError(StoreError):
    """A correction id that the ledger does not know, or that is not applied."""
