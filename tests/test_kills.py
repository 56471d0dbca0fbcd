"""Kill -9 the running service 25 times, at every step that matters and at random moments: after
each restart the store is one tagged version with `dvc status` clean, the ledger agrees with it,
and in the end every correction sent was received and decided exactly once."""
from __future__ import annotations

from pathlib import Path

import pytest

from decision_helpers import ACCEPT_ALL, make_decision_home
from service_harness import configure, free_port, kill_rounds
from store.crash import COMMIT_POINTS, SERVICE_POINTS

ROUNDS = 25


@pytest.mark.timeout(2400)  # 26 starts of the service: minutes on a shared 2-core machine
def test_25_kills_at_every_step_and_at_random_lose_and_corrupt_nothing(tmp_path: Path, data_root) -> None:
    home = make_decision_home(tmp_path / "home", ACCEPT_ALL, data_root)
    feed = tmp_path / "feed.jsonl"
    feed.touch()
    configure(home, free_port(), [{"name": "file", "kind": "file", "path": str(feed), "interval_s": 1}],
              **{"batch_size: 1": "batch_size: 2"})
    report = kill_rounds(home, feed, tmp_path / "service.log", ROUNDS, SERVICE_POINTS + COMMIT_POINTS, seed=7)
    assert report.kills >= ROUNDS
    assert not report.problems, "\n".join(report.problems) + "\n" + (tmp_path / "service.log").read_text()[-3000:]
    assert report.final.lost == []
    assert report.final.statuses["quarantined"] == report.malformed
    assert report.final.statuses["pending"] == 0
    reached = [m for m in report.by_moment if "not reached" not in m and m != "random"]
    assert set(reached) == set(SERVICE_POINTS + COMMIT_POINTS), report.by_moment
