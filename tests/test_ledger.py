"""The ledger on SQLite and on a real PostgreSQL server: the same code, the same behaviour."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from postgres_server import pg_bin, postgres_server
from store.ledger import Ledger, content_hash, upgraded
from store.ledger_schema import Base, CorrectionStatus
from store.versions import Version

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def postgres_url():
    if pg_bin() is None:
        pytest.skip("PostgreSQL is not installed: apt-get install postgresql (CI's .ci/run does)")
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request, tmp_path: Path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state' / 'ledger.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
        _drop_everything(url)
    opened = Ledger(url)
    yield opened
    opened.close()


def _drop_everything(url: str) -> None:
    """Each PostgreSQL test starts from an empty database, like each SQLite one."""
    from sqlalchemy import create_engine

    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    upgraded.discard(url)  # the schema is gone: the next ledger must create it again


def version(tag: str, kind: str, parent: str | None, corrections: tuple[str, ...] = (),
            restores: str | None = None, run_id: str | None = None) -> Version:
    return Version(tag=tag, sha=tag * 5, parent=parent, kind=kind, created_at=T0, corrections=corrections,
                   run_id=run_id, restores=restores, reason="", figures={"locality": 0.9}, model_md5=f"{tag}.dir")


def fact(text_: str) -> dict[str, str]:
    return {"prompt": text_, "target_new": "x"}


def test_migrations_build_exactly_the_schema_of_the_models(ledger: Ledger) -> None:
    with ledger.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0001"


def test_the_same_correction_received_twice_is_stored_once(ledger: Ledger) -> None:
    first, created = ledger.receive("feed-a", "c1", fact("p1"))
    again, created_again = ledger.receive("feed-a", "c1", fact("p1"))
    same_content, created_third = ledger.receive("feed-b", "other-id", fact("p1"))
    assert (created, created_again, created_third) == (True, False, False)
    assert first.key == again.key == same_content.key
    assert len(ledger.corrections()) == 1


def test_an_id_is_taken_when_a_correction_of_other_content_holds_it_here_or_earlier_in_the_batch(ledger: Ledger) -> None:
    ledger.receive("feed-a", "c1", fact("p1"))
    h = content_hash
    records = [("c1", h(fact("p1"))), ("c1", h(fact("p2"))), ("c2", h(fact("p3"))), ("c2", h(fact("p4"))),
               ("c3", h(fact("p1")))]
    assert ledger.ids_taken("feed-b", records) == {1: "feed-a", 3: "feed-b"}


def test_only_a_resubmission_makes_a_rolled_back_correction_pending_again(ledger: Ledger) -> None:
    ledger.receive("feed", "c1", fact("c1"))
    ledger.record_version(version("v0001", "edit", "v0000", ("c1",)), {"c1": "v0001"})
    ledger.record_version(version("v0002", "rollback", "v0001", restores="v0000"), {})
    ledger.receive("feed", "c1", fact("c1"))  # the feed read again
    assert ledger.correction("c1").status == CorrectionStatus.rolled_back
    again, created = ledger.receive("feed", "c1", fact("c1"), resubmit=True)
    assert not created and again.status == CorrectionStatus.pending and len(ledger.corrections()) == 1
    assert again.reason == "resubmitted after rolled_back"


def test_concurrent_receivers_store_one_row(ledger: Ledger) -> None:
    results: list[bool] = []

    def receive() -> None:
        results.append(ledger.receive("feed", "c1", fact("same"))[1])

    threads = [threading.Thread(target=receive) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 5 + [True] and len(ledger.corrections()) == 1


def test_the_first_records_of_a_new_feed_arriving_at_once_are_all_stored(ledger: Ledger) -> None:
    # A pull and a POST may both make the feed's row; neither record may be lost to the race.
    barrier = threading.Barrier(6)

    def receive(number: int) -> None:
        barrier.wait()
        ledger.receive("new-feed", f"c{number}", fact(f"fact {number}"))

    threads = [threading.Thread(target=receive, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(c.external_id for c in ledger.corrections()) == [f"c{n}" for n in range(6)]


def test_reading_a_cursor_makes_no_feed_row(ledger: Ledger) -> None:
    # /v1/status reads every feed's cursor while the feeds' first pulls make their rows.
    assert ledger.cursor("never-pulled") is None
    ledger.receive("never-pulled", "c1", fact("one"))
    assert ledger.cursor("never-pulled") is None and len(ledger.corrections()) == 1


def test_pending_corrections_come_oldest_first(ledger: Ledger) -> None:
    for minutes, name in ((3, "late"), (1, "early"), (2, "middle")):
        ledger.receive("feed", name, fact(name), received_at=T0 + timedelta(minutes=minutes))
    assert [c.external_id for c in ledger.pending(2)] == ["early", "middle"]
    assert ledger.pending(5)[0].received_at == T0 + timedelta(minutes=1)


def test_versions_set_each_correction_status_from_what_the_weights_carry(ledger: Ledger) -> None:
    for name in ("c1", "c2"):
        ledger.receive("feed", name, fact(name))
    ledger.record_version(version("v0000", "base", None), {})
    ledger.record_version(version("v0001", "edit", "v0000", ("c1",), run_id="r1"), {"c1": "v0001"})
    ledger.record_version(version("v0002", "edit", "v0001", ("c2",), run_id="r2"), {"c1": "v0001", "c2": "v0002"})
    c2 = ledger.correction("c2")
    assert (c2.status, c2.version, c2.run_id) == (CorrectionStatus.applied, "v0002", "r2")
    ledger.record_version(version("v0003", "rollback", "v0002", restores="v0001"), {"c1": "v0001"})
    c2 = ledger.correction("c2")
    assert c2.status == CorrectionStatus.rolled_back and c2.reason == "rolled back by v0003 (to v0001)"
    ledger.record_version(version("v0004", "revert", "v0003", ("c1",)), {})
    assert ledger.correction("c1").reason == "reverted by v0004"
    assert ledger.recorded_tags() == ["v0000", "v0001", "v0002", "v0003", "v0004"]


def test_recording_a_version_twice_changes_nothing(ledger: Ledger) -> None:
    ledger.receive("feed", "c1", fact("c1"))
    v1 = version("v0001", "edit", "v0000", ("c1",), run_id="r1")
    ledger.record_version(v1, {"c1": "v0001"})
    before = ledger.correction("c1")
    ledger.record_version(v1, {})  # a replay with a wrong lineage must not undo anything
    assert ledger.correction("c1") == before and ledger.recorded_tags() == ["v0001"]


def test_marking_a_decision_keeps_its_run_and_reason(ledger: Ledger) -> None:
    stored, _ = ledger.receive("feed", "c1", fact("c1"))
    ledger.mark([stored.key], CorrectionStatus.rejected, run_id="run-9", reason="locality 0.41 < 0.95")
    found = ledger.correction("c1")
    assert (found.status, found.run_id, found.reason) == (CorrectionStatus.rejected, "run-9", "locality 0.41 < 0.95")


def test_feed_cursors_and_cycles_are_kept(ledger: Ledger) -> None:
    assert ledger.cursor("feed") is None
    ledger.set_cursor("feed", "byte:1234")
    cycle = ledger.start_cycle()
    ledger.finish_cycle(cycle, "accepted", version="v0001", run_ids=["r1", "r2"])
    reopened = Ledger(ledger.url)
    assert reopened.cursor("feed") == "byte:1234"
    (recorded,) = reopened.cycles()
    assert (recorded.outcome, recorded.version, recorded.run_ids) == ("accepted", "v0001", ["r1", "r2"])
    assert recorded.finished_at >= recorded.started_at
    reopened.close()


def test_events_are_recorded_in_order(ledger: Ledger) -> None:
    ledger.record_event("recovery", "undone", "v0000")
    ledger.record_event("operator-checkout", "to v0001", "v0005")
    assert [(e.kind, e.version) for e in ledger.events()] == [("recovery", "v0000"), ("operator-checkout", "v0005")]


def test_a_second_ledger_on_the_same_database_does_not_run_the_migrations_again(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    first = Ledger(url)
    assert url in upgraded
    with first.engine.begin() as connection:
        # Without its recorded revision, a migration run would create every table again, and fail.
        connection.execute(text("DELETE FROM alembic_version"))
    second = Ledger(url)
    with second.engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 0
    second.close()
    first.close()


def test_the_sqlite_ledger_runs_in_wal_mode(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    with ledger.engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    ledger.close()
