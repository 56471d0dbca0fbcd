"""Failing dependencies: the ledger locked by another process, the MLflow server gone, a feed's
server gone, the store's disk full or read-only mid-commit. Each time the cycle fails cleanly, the
service stays up, /healthz says degraded and why, and it recovers by itself once the fault is gone,
with nothing lost and the store one clean version."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from decision_helpers import ACCEPT_ALL, make_decision_home
from service_harness import (FeedServer, SmallDisk, audit, configure, free_port, line, post_corrections, problems,
                             start_mlflow_server, start_service, wait_for)


class Running:
    """A service on a tiny-llama home that accepts every edit, with its API address."""

    def __init__(self, tmp_path: Path, data_root, feeds: list[dict] | None = None, **replace: str):
        self.home = make_decision_home(tmp_path / "home", ACCEPT_ALL, data_root)
        port = free_port()
        configure(self.home, port, feeds or [], **replace)
        self.api = f"http://127.0.0.1:{port}"
        self.log = tmp_path / "service.log"
        self.process = None

    def start(self) -> "Running":
        self.process = start_service(self.home, self.log)
        wait_for(lambda: self.home.health_path.exists() and problems(self.api) == {}, 180, "a healthy start", self.process)
        return self

    def degraded(self, component: str, seconds: float = 180) -> str:
        """Wait until /healthz names `component`; its reason."""
        return wait_for(lambda: problems(self.api).get(component), seconds, f"/healthz to name {component}", self.process)

    def recovered(self, seconds: float = 180) -> None:
        wait_for(lambda: problems(self.api) == {}, seconds, "/healthz to recover", self.process)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            assert self.process.wait(timeout=120) == 0, self.log.read_text()[-3000:]

    def assert_whole(self, sent: list[str]) -> None:
        found = audit(self.home, sent)
        assert (found.lost, found.duplicated, found.corrupted) == ([], [], []), found
        assert found.statuses["pending"] == 0 and found.head != "v0000", found


@pytest.fixture
def service(tmp_path: Path, data_root):
    made: list[Running] = []

    def make(**kwargs) -> Running:
        made.append(Running(tmp_path, data_root, **kwargs))
        return made[-1]

    yield make
    for running in made:
        if running.process is not None and running.process.poll() is None:
            running.process.kill()


def test_a_ledger_locked_by_another_process_degrades_the_cycle_until_released(service) -> None:
    # one correction waits max_wait_s for company; meanwhile another process takes the write lock
    running = service(**{"min_pending: 1": "min_pending: 100", "max_wait_s: 300.0": "max_wait_s: 8.0"}).start()
    post_corrections(running.api, line("k1", "The capital of Spain is", "Lisbon"))
    locker = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
        "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(600)"),
        running.home.ledger_url[len("sqlite:///"):]], stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline().strip() == "locked"
        assert "database is locked" in running.degraded("cycle")
        assert audit_pending(running) == ["k1"]
    finally:
        locker.kill()
        locker.wait()
    running.recovered()
    running.stop()
    running.assert_whole(["k1"])


def audit_pending(running: Running) -> list[str]:
    from store.ledger import Ledger
    from store.ledger_schema import CorrectionStatus

    ledger = Ledger(running.home.ledger_url)
    try:
        return [row.external_id for row in ledger.corrections(CorrectionStatus.pending)]
    finally:
        ledger.close()


def test_a_tracking_server_that_goes_away_degrades_the_cycle_until_it_is_back(service) -> None:
    mlflow_port = free_port()
    running = service(**{"tracking_uri: null": f'tracking_uri: "http://127.0.0.1:{mlflow_port}"'})
    server = start_mlflow_server_for(running, mlflow_port)
    try:
        running.start()
        server.terminate()
        server.wait(timeout=60)
        post_corrections(running.api, line("m1", "The capital of Spain is", "Lisbon"))
        reason = running.degraded("cycle")
        assert "127.0.0.1" in reason or "Connection" in reason, reason
        assert audit_pending(running) == ["m1"]  # nothing decided without its record
        server = start_mlflow_server_for(running, mlflow_port)
        running.recovered()
        running.stop()
    finally:
        server.kill()
    running.assert_whole(["m1"])


def start_mlflow_server_for(running: Running, port: int):
    """The MLflow server on the home's own database (mendd.yaml names the server, not the file)."""
    text = running.home.config_path.read_text()
    running.home.config_path.write_text(text.replace(f'tracking_uri: "http://127.0.0.1:{port}"', "tracking_uri: null"))
    try:
        return start_mlflow_server(running.home, port)
    finally:
        running.home.config_path.write_text(text)


def test_a_feed_server_that_goes_away_degrades_the_feed_until_it_is_back(service) -> None:
    feed = FeedServer(line("w1", "The capital of Spain is", "Lisbon"))
    running = service(feeds=[{"name": "web", "kind": "http", "url": feed.url, "interval_s": 1, "timeout_s": 2}]).start()
    feed.stop()
    feed.body = (line("w1", "The capital of Spain is", "Lisbon") + line("w2", "Water boils at", "fifty")).encode()
    assert "unreachable" in running.degraded("feed:web")
    feed.restart()
    running.recovered()
    wait_for(lambda: audit_pending(running) == [] and feed.requests > 1, 180, "w2 to be pulled and decided", running.process)
    running.stop()
    feed.stop()
    running.assert_whole(["w1", "w2"])


@pytest.mark.skipif(not SmallDisk.available(), reason="mounting a tmpfs needs root (CAP_SYS_ADMIN)")
@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_a_store_disk_that_fills_up_or_turns_read_only_mid_commit_is_recovered(service, fault: str) -> None:
    running = service()
    disk = SmallDisk.around(running.home.store_dir, size_mb=64)
    try:
        running.start()
        if fault == "full":
            filler = disk.fill(leave_bytes=48 * 1024)  # room for the journal, not for the tensors
        else:
            disk.read_only(True)
        post_corrections(running.api, line("d1", "The capital of Spain is", "Lisbon"))
        reason = running.degraded("cycle")
        assert ("No space left" in reason) if fault == "full" else ("Read-only" in reason), reason
        assert audit_pending(running) == ["d1"]
        if fault == "full":
            filler.unlink()
        else:
            disk.read_only(False)
        running.recovered()
        running.stop()
        running.assert_whole(["d1"])
    finally:
        if running.process is not None and running.process.poll() is None:
            running.process.kill()
            running.process.wait()
        disk.release()
