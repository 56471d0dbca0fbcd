"""Kill -9 the running service 25 times, at every step that matters (deciding, committing, holding,
approving) and at random moments: after each restart the store is one tagged version with `dvc
status` clean, the ledger agrees with it and with the runs waiting for review, and in the end every
correction sent was received and decided, and none is in the model twice."""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.commits import edit_change
from daemon.versioning import sync_ledger
from decision_helpers import ACCEPT_ALL, make_decision_home
from service_harness import KILL_SCHEDULE, audit, configure, free_port, kill_at, kill_rounds
from store.crash import TAGGED
from store_helpers import FACTS, make_home, mend_delta, open_home

ROUNDS = 25


@pytest.mark.long
@pytest.mark.timeout(2700)  # 26 starts of the service: minutes on a shared 2-core machine
def test_25_kills_in_decisions_commits_holds_and_approvals_lose_and_corrupt_nothing(tmp_path: Path, data_root) -> None:
    home = make_decision_home(tmp_path / "home", ACCEPT_ALL, data_root)
    feed = tmp_path / "feed.jsonl"
    feed.touch()
    configure(home, free_port(), [{"name": "file", "kind": "file", "path": str(feed), "interval_s": 1}],
              **{"batch_size: 1": "batch_size: 2"})
    report = kill_rounds(home, feed, tmp_path / "service.log", ROUNDS, KILL_SCHEDULE, seed=7)
    assert report.unkilled == [], report.unkilled
    assert report.kills == ROUNDS
    assert set(report.by_moment) == {f"{mode} at {moment}" for moment, mode in KILL_SCHEDULE}, report.by_moment
    assert not report.problems, "\n".join(report.problems) + "\n" + (tmp_path / "service.log").read_text()[-3000:]
    assert report.final.lost == []
    assert report.final.statuses["quarantined"] == report.malformed
    assert report.final.statuses["pending"] == report.final.statuses["held"] == 0


def child(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code])


def test_a_process_that_exits_before_its_crash_point_is_not_counted_as_killed() -> None:
    assert kill_at(child("raise SystemExit(1)"), TAGGED, random.Random(0)) == "exited with code 1 before its crash point"


def test_a_process_that_kills_itself_at_its_crash_point_is_killed() -> None:
    assert kill_at(child("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"), TAGGED, random.Random(0)) == "killed"


def test_a_process_gone_before_the_random_kill_is_not_counted_as_killed() -> None:
    process = child("pass")
    process.wait()
    assert kill_at(process, "random", random.Random(0)).startswith("exited by itself with code 0")


def test_the_audit_finds_a_correction_whose_change_was_committed_twice(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    delta = mend_delta(FACTS[:1])
    versions = open_home(home)
    try:
        for run in ("r1", "r1-again"):  # past the commit guard, as a store written by an older mendd could be
            versions.store.commit(edit_change(versions, delta, run_id=run, figures={}))
        sync_ledger(versions)
    finally:
        versions.close()
    assert audit(home, []).duplicated == ["c1 (again by v0002)"]
