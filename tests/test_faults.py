"""Failing dependencies: the ledger locked by another process, the MLflow server gone, a feed's
server gone, the store's disk full or read-only mid-commit. Each time the cycle fails cleanly, the
service stays up, /healthz says degraded and why, and it recovers by itself once the fault is gone,
with nothing lost and the store one clean version. (The scenarios live in service_harness, so
bench/reliability.py runs the same ones.)"""
from __future__ import annotations

from pathlib import Path

import pytest

from service_harness import (Running, SmallDisk, feed_server_goes_away, hostile_producer, ledger_locked,
                             store_disk_fault, tracking_server_goes_away)

# Each scenario starts the real service and waits for it to degrade and recover: minutes in all.
pytestmark = pytest.mark.long


@pytest.fixture
def service(tmp_path: Path, data_root):
    made: list[Running] = []

    def make(**kwargs) -> Running:
        made.append(Running(tmp_path / f"service{len(made)}", data_root, **kwargs))
        return made[-1]

    yield make
    for running in made:
        running.kill()


def test_a_ledger_locked_by_another_process_degrades_the_cycle_until_released(service) -> None:
    ledger_locked(service)


def test_a_tracking_server_that_goes_away_degrades_the_cycle_until_it_is_back(service) -> None:
    tracking_server_goes_away(service)


def test_a_feed_server_that_goes_away_degrades_the_feed_until_it_is_back(service) -> None:
    feed_server_goes_away(service)


@pytest.mark.skipif(not SmallDisk.available(), reason="mounting a tmpfs needs root (CAP_SYS_ADMIN)")
@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_a_store_disk_that_fills_up_or_turns_read_only_mid_commit_is_recovered(service, fault: str) -> None:
    store_disk_fault(service, fault)


def test_a_hostile_producers_records_are_quarantined_and_its_good_ones_all_arrive(service) -> None:
    checked = hostile_producer(service)
    assert checked["quarantined"] == checked["bad_records"]
