"""One picture of a home: served version, corrections by status, last cycle, feed cursors, health.
The service serves it at /v1/status; `mendd status` builds it from the home when asked."""
from __future__ import annotations

from daemon.versioning import Versions


def snapshot(versions: Versions, health: dict, feeds: list[str]) -> dict:
    ledger = versions.ledger
    head = versions.store.head()
    cycles = ledger.cycles()
    last = cycles[-1] if cycles else None
    return {
        "version": head.tag,
        "corrections": ledger.counts(),
        "last_cycle": None if last is None else {
            "id": last.id, "started_at": last.started_at.isoformat(),
            "finished_at": last.finished_at.isoformat() if last.finished_at else None,
            "outcome": last.outcome, "version": last.version, "detail": last.detail},
        "feeds": {name: ledger.cursor(name) for name in feeds},
        "health": health,
    }
