"""Feeds read only what is new, store every record once (bad ones quarantined with a reason), and
move their cursor only after the records are in the ledger."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.config import FeedConfig
from editors import formats
from daemon.feeds import FeedError, IntakeReport, pull
from daemon.home import Home
from store.ledger import Ledger
from store.ledger_schema import CorrectionStatus
from test_service import FeedServer, line


@pytest.fixture
def home(tmp_path: Path) -> Home:
    home = Home(tmp_path / "home")
    home.state_dir.mkdir(parents=True)
    return home


@pytest.fixture
def ledger(home: Home):
    ledger = Ledger(home.ledger_url)
    yield ledger
    ledger.close()


def statuses(ledger: Ledger) -> dict[str, str]:
    return {row.external_id: row.status.value for row in ledger.corrections()}


def pull_until_idle(feed: FeedConfig, ledger: Ledger, home: Home, most: int = 20) -> list[IntakeReport]:
    """Every pull's report until one reads nothing (a bounded pull leaves the rest to the next)."""
    reports = [pull(feed, ledger, home)]
    while reports[-1].received + reports[-1].duplicates + reports[-1].quarantined:
        assert len(reports) < most, "the feed never ran dry"
        reports.append(pull(feed, ledger, home))
    return reports


def rewrite_in_place(path: Path, text: str) -> None:
    """The producer rewrites the file itself (same inode), as `> file` or truncate-and-write do."""
    inode = path.stat().st_ino
    with open(path, "r+b") as handle:
        handle.truncate(0)
        handle.write(text.encode())
    assert path.stat().st_ino == inode


def test_a_file_feed_reads_appended_records_once(tmp_path: Path, home: Home, ledger: Ledger) -> None:
    path = tmp_path / "feed.jsonl"
    path.write_text(line("a", "The sky is", "green"))
    feed = FeedConfig(name="f", kind="file", path=path)
    assert pull(feed, ledger, home).received == 1
    assert pull(feed, ledger, home).received == 0  # unchanged: nothing read
    with open(path, "a") as handle:
        handle.write(line("b", "Grass is", "blue"))
    report = pull(feed, ledger, home)
    assert (report.received, report.duplicates) == (1, 0)
    assert json.loads(ledger.cursor("f"))["position"] == 2
    assert statuses(ledger) == {"a": "pending", "b": "pending"}


def test_a_replaced_file_is_read_again_and_the_ledger_keeps_one_of_each(tmp_path: Path, home: Home, ledger: Ledger) -> None:
    path = tmp_path / "feed.jsonl"
    path.write_text(line("a", "The sky is", "green") + line("b", "Grass is", "blue"))
    feed = FeedConfig(name="f", kind="file", path=path)
    pull(feed, ledger, home)
    replacement = tmp_path / "new.jsonl"
    replacement.write_text(line("a", "The sky is", "green"))
    replacement.replace(path)  # a new file (new inode), shorter
    report = pull(feed, ledger, home)
    assert (report.received, report.duplicates) == (0, 1)


def test_bad_records_are_quarantined_with_their_reason_and_the_rest_go_on(tmp_path: Path, home: Home, ledger: Ledger) -> None:
    path = tmp_path / "feed.jsonl"
    path.write_bytes(line("a", "The sky is", "green").encode() + b"{oops\n" + b'{"id": "c", "prompt": 3, "target_new": "x"}\n'
                     + b"\xff\xfe\n" + line("d", "Grass is", "blue").encode())
    report = pull(FeedConfig(name="f", kind="file", path=path), ledger, home)
    assert (report.received, report.quarantined) == (2, 3)
    rows = ledger.corrections(CorrectionStatus.quarantined)
    assert any("field 'prompt': must be a string, got int" in row.reason for row in rows)
    assert len(home.quarantine_path.read_text().splitlines()) == 3


def test_a_quarantined_record_is_kept_as_received(tmp_path: Path, home: Home, ledger: Ledger) -> None:
    path = tmp_path / "feed.jsonl"
    path.write_bytes(b"{oops\n" + b'{"id": "c\\n2", "prompt": "The sky is", "target_new": "x"}\n')
    pull(FeedConfig(name="f", kind="file", path=path), ledger, home)
    kept = [row.payload["raw"] for row in ledger.corrections(CorrectionStatus.quarantined)]
    assert kept == ["{oops\n", '{"id": "c\\n2", "prompt": "The sky is", "target_new": "x"}']


def test_different_bad_records_at_the_same_place_are_each_quarantined(home: Home, ledger: Ledger) -> None:
    import io

    from daemon.feeds import ingest, located

    bodies = [json.dumps({"id": f"bad id {n}", "prompt": "The sky is", "target_new": "x"}).encode() for n in range(3)]
    reports = [ingest(ledger, home, "api", located("api", io.BytesIO(body))) for body in bodies]  # three POSTs' line 1
    again = ingest(ledger, home, "api", located("api", io.BytesIO(bodies[0])))
    assert [r.quarantined for r in reports] == [1, 1, 1]
    assert (again.quarantined, again.duplicates) == (0, 1)


def test_a_record_under_an_id_another_feed_already_holds_is_quarantined_with_its_content(
        tmp_path: Path, home: Home, ledger: Ledger) -> None:
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text(line("c1", "The sky is", "green"))
    second.write_text(line("c1", "Grass is", "blue") + line("c2", "Snow is", "black"))
    pull(FeedConfig(name="first", kind="file", path=first), ledger, home)
    report = pull(FeedConfig(name="second", kind="file", path=second), ledger, home)
    assert (report.received, report.quarantined) == (1, 1)
    [held] = ledger.corrections(CorrectionStatus.quarantined)
    assert "record #1, field 'id': 'c1' already names another correction (from feed 'first')" in held.reason
    assert held.payload["record"] == {"id": "c1", "prompt": "Grass is", "target_new": "blue"}
    assert ledger.correction("c1").payload["prompt"] == "The sky is"
    assert "'c1' already names" in home.quarantine_path.read_text()


def test_a_changed_record_under_an_id_its_own_feed_sent_is_quarantined_not_dropped_as_a_repeat(
        tmp_path: Path, home: Home, ledger: Ledger) -> None:
    path = tmp_path / "feed.jsonl"
    path.write_text(line("c1", "The sky is", "green"))
    feed = FeedConfig(name="f", kind="file", path=path)
    pull(feed, ledger, home)
    replacement = tmp_path / "new.jsonl"
    replacement.write_text(line("c1", "The sky is", "green") + line("c1", "The sky is", "purple"))
    replacement.replace(path)
    report = pull(feed, ledger, home)
    assert (report.received, report.duplicates, report.quarantined) == (0, 1, 1)
    [held] = ledger.corrections(CorrectionStatus.quarantined)
    assert "record #2, field 'id'" in held.reason and held.payload["record"]["target_new"] == "purple"


def test_an_append_only_file_feed_keeps_reading_its_new_lines_once_it_is_over_max_bytes(
        tmp_path: Path, home: Home, ledger: Ledger) -> None:
    path = tmp_path / "feed.jsonl"
    path.write_text("".join(line(f"r{i}", f"Fact {i} is", "true") for i in range(6)))
    feed = FeedConfig(name="f", kind="file", path=path, max_bytes=len(line("r0", "Fact 0 is", "true")) * 2)
    while pull(feed, ledger, home).received:
        pass
    with open(path, "a") as handle:
        handle.write(line("new", "Grass is", "blue"))
    assert pull(feed, ledger, home).received == 1
    assert len(statuses(ledger)) == 7


def test_a_pull_reads_at_most_max_bytes_of_whole_lines_and_the_next_pull_reads_on(
        tmp_path: Path, home: Home, ledger: Ledger) -> None:
    path = tmp_path / "feed.jsonl"
    lines = [line(f"r{i}", f"Fact {i} is", "true") for i in range(7)]
    path.write_text("".join(lines))
    feed = FeedConfig(name="f", kind="file", path=path, max_bytes=len(lines[0]) * 3 - 1)  # two whole lines and a part
    assert [pull(feed, ledger, home).received for _ in range(5)] == [2, 2, 2, 1, 0]
    assert json.loads(ledger.cursor("f"))["position"] == 7


def test_a_line_longer_than_max_bytes_is_quarantined_and_the_feed_reads_on(tmp_path: Path, home: Home, ledger: Ledger) -> None:
    path = tmp_path / "feed.jsonl"
    path.write_text(line("a", "The sky is", "green") + line("b", "Grass is", "x" * 500) + line("c", "Snow is", "red"))
    feed = FeedConfig(name="f", kind="file", path=path, max_bytes=200)
    reports = pull_until_idle(feed, ledger, home)
    assert sum(r.quarantined for r in reports) == 1
    [held] = ledger.corrections(CorrectionStatus.quarantined)
    assert "line 2" in held.reason and "longer than max_bytes 200" in held.reason
    assert statuses(ledger) == {"a": "pending", "c": "pending", held.external_id: "quarantined"}


def test_a_half_written_last_line_waits_for_its_newline_and_is_stored_whole(tmp_path: Path, home: Home, ledger: Ledger) -> None:
    path = tmp_path / "feed.jsonl"
    second = line("b", "Grass is", "blue")
    path.write_text(line("a", "The sky is", "green") + second[:20])  # the producer is mid-write at the pull
    feed = FeedConfig(name="f", kind="file", path=path)
    report = pull(feed, ledger, home)
    assert (report.received, report.quarantined) == (1, 0)
    with open(path, "a") as handle:
        handle.write(second[20:])
    report = pull(feed, ledger, home)
    assert (report.received, report.duplicates, report.quarantined) == (1, 0, 0)
    assert statuses(ledger) == {"a": "pending", "b": "pending"}
    assert not home.quarantine_path.exists()


def test_a_last_record_without_a_newline_is_read_at_once_and_not_again_when_the_file_goes_on(
        tmp_path: Path, home: Home, ledger: Ledger) -> None:
    path = tmp_path / "feed.jsonl"
    path.write_text(line("a", "The sky is", "green") + line("b", "Grass is", "blue").rstrip("\n"))
    feed = FeedConfig(name="f", kind="file", path=path)
    assert pull(feed, ledger, home).received == 2  # a whole JSON record: its producer just ends the file without a newline
    assert pull(feed, ledger, home).received == 0
    with open(path, "a") as handle:
        handle.write("\n" + line("c", "Snow is", "red"))
    report = pull(feed, ledger, home)
    assert (report.received, report.duplicates, report.quarantined) == (1, 0, 0)
    assert json.loads(ledger.cursor("f"))["position"] == 3
    assert statuses(ledger) == {"a": "pending", "b": "pending", "c": "pending"}


def test_a_last_record_without_a_newline_rewritten_in_place_is_read_again(tmp_path: Path, home: Home, ledger: Ledger) -> None:
    path = tmp_path / "feed.jsonl"
    path.write_text(line("a", "The sky is", "green").rstrip("\n"))  # as `printf '%s' "$record" > feed.jsonl` writes
    feed = FeedConfig(name="f", kind="file", path=path)
    assert pull(feed, ledger, home).received == 1
    rewrite_in_place(path, line("b", "Grass is", "blue").rstrip("\n"))
    assert pull(feed, ledger, home).received == 1
    assert statuses(ledger) == {"a": "pending", "b": "pending"}


OLD = [line(f"old{i}", f"Old fact {i} is", "true") for i in range(3)]
REWRITES = {  # what the producer writes over the three old records, each keeping one of them
    "shorter": OLD[1] + line("n1", "New fact is", "x"),
    "same length": OLD[0] + line("new0", "New fact 0 is", "true") + line("new1", "New fact 1 is", "true"),
    "regrown past the old offset": OLD[2] + "".join(line(f"new{i}", f"New fact {i} is", "true") for i in range(4)),
}


@pytest.mark.parametrize("rewrite", REWRITES)
def test_a_file_rewritten_in_place_is_read_again_from_its_start(tmp_path: Path, home: Home, ledger: Ledger, rewrite: str) -> None:
    path = tmp_path / "feed.jsonl"
    path.write_text("".join(OLD))
    feed = FeedConfig(name="f", kind="file", path=path)
    assert pull(feed, ledger, home).received == 3
    text = REWRITES[rewrite]
    assert (len(text) == len("".join(OLD))) == (rewrite == "same length")
    rewrite_in_place(path, text)
    reports = pull_until_idle(feed, ledger, home)
    new = [json.loads(record)["id"] for record in text.splitlines()[1:]]
    assert (sum(r.received for r in reports), sum(r.duplicates for r in reports), sum(r.quarantined for r in reports)) == (len(new), 1, 0)
    assert statuses(ledger) == {cid: "pending" for cid in ["old0", "old1", "old2", *new]}
    with open(path, "a") as handle:  # and it is followed again as it grows
        handle.write(line("later", "Later fact is", "x"))
    assert (pull(feed, ledger, home).received, len(statuses(ledger))) == (1, 4 + len(new))


def test_a_pull_stores_at_most_max_records_and_the_next_pulls_store_the_rest_once(
        tmp_path: Path, home: Home, ledger: Ledger) -> None:
    path = tmp_path / "feed.jsonl"
    path.write_text("".join(line(f"r{i}", f"Fact {i} is", "true") for i in range(25)))
    feed = FeedConfig(name="f", kind="file", path=path, max_records=10)
    reports = pull_until_idle(feed, ledger, home)
    assert [r.received for r in reports] == [10, 10, 5, 0]
    assert sum(r.duplicates for r in reports) == 0 and len(statuses(ledger)) == 25


def test_a_json_array_file_is_bounded_by_max_records_and_reread_when_rewritten(
        tmp_path: Path, home: Home, ledger: Ledger) -> None:
    path = tmp_path / "feed.json"
    records = [{"id": f"r{i}", "prompt": f"Fact {i} is", "target_new": "true"} for i in range(5)]
    path.write_text(json.dumps(records))
    feed = FeedConfig(name="f", kind="file", path=path, max_records=2)
    assert [r.received for r in pull_until_idle(feed, ledger, home)] == [2, 2, 1, 0]
    rewrite_in_place(path, json.dumps(records + [{"id": "r5", "prompt": "Fact 5 is", "target_new": "true"}]))
    assert sum(r.received for r in pull_until_idle(feed, ledger, home)) == 1
    assert len(statuses(ledger)) == 6


@pytest.fixture
def brittle_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading the record with id "b" fails as a bug would, not as a bad record does."""
    parse = formats.parse_record

    def brittle(record, *args, **kwargs):
        if record.get("id") == "b":
            raise RuntimeError("a bug, not the record's fault")
        return parse(record, *args, **kwargs)

    monkeypatch.setattr(formats, "parse_record", brittle)


def test_a_record_whose_reading_fails_unexpectedly_is_quarantined_and_the_feed_reads_past_it(
        tmp_path: Path, home: Home, ledger: Ledger, brittle_parser) -> None:
    path = tmp_path / "feed.jsonl"
    path.write_text(line("a", "The sky is", "green") + line("b", "Grass is", "blue") + line("c", "Snow is", "red"))
    feed = FeedConfig(name="f", kind="file", path=path)
    reports = pull_until_idle(feed, ledger, home)
    assert (sum(r.received for r in reports), sum(r.quarantined for r in reports)) == (2, 1)
    [held] = ledger.corrections(CorrectionStatus.quarantined)
    assert "RuntimeError: a bug, not the record's fault" in held.reason
    with open(path, "a") as handle:
        handle.write(line("d", "Coal is", "white"))
    assert pull(feed, ledger, home).received == 1


def test_a_dropped_file_whose_reading_fails_unexpectedly_does_not_hold_up_the_folder(
        tmp_path: Path, home: Home, ledger: Ledger, brittle_parser) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "1.jsonl").write_text(line("b", "Grass is", "blue"))
    (drop / "2.jsonl").write_text(line("c", "Snow is", "red"))
    report = pull(FeedConfig(name="d", kind="dir", path=drop), ledger, home)
    assert (report.received, report.quarantined) == (1, 1)
    assert (drop / "quarantine" / "1.jsonl").exists() and (drop / "done" / "2.jsonl").exists()


def test_a_missing_feed_file_is_a_feed_error(tmp_path: Path, home: Home, ledger: Ledger) -> None:
    with pytest.raises(FeedError, match="does not exist"):
        pull(FeedConfig(name="f", kind="file", path=tmp_path / "nope.jsonl"), ledger, home)


def test_a_drop_folder_moves_files_to_done_or_quarantine_and_skips_partial_ones(tmp_path: Path, home: Home, ledger: Ledger) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "good.jsonl").write_text(line("a", "The sky is", "green"))
    (drop / "bad.json").write_text("[not json")
    (drop / "coming.jsonl.part").write_text(line("b", "Grass is", "blue"))
    report = pull(FeedConfig(name="d", kind="dir", path=drop), ledger, home)
    assert (report.received, report.quarantined) == (1, 1)
    assert (drop / "done" / "good.jsonl").exists() and (drop / "quarantine" / "bad.json").exists()
    assert (drop / "coming.jsonl.part").exists()


def test_an_http_feed_sends_its_etag_and_reads_nothing_on_304(home: Home, ledger: Ledger) -> None:
    server = FeedServer(line("a", "The sky is", "green"))
    try:
        feed = FeedConfig(name="w", kind="http", url=server.url)
        assert pull(feed, ledger, home).received == 1
        assert pull(feed, ledger, home).received == 0
        assert server.requests == 2 and json.loads(ledger.cursor("w"))["etag"]
    finally:
        server.server.shutdown()


def test_an_http_response_over_the_size_cap_is_refused(home: Home, ledger: Ledger) -> None:
    server = FeedServer(line("a", "The sky is", "green") * 50)
    try:
        with pytest.raises(FeedError, match="over max_bytes"):
            pull(FeedConfig(name="w", kind="http", url=server.url, max_bytes=100), ledger, home)
        assert ledger.corrections() == []
    finally:
        server.server.shutdown()


def test_an_unreachable_http_feed_is_a_feed_error(home: Home, ledger: Ledger) -> None:
    with pytest.raises(FeedError, match="unreachable"):
        pull(FeedConfig(name="w", kind="http", url="http://127.0.0.1:9/feed", timeout_s=2), ledger, home)


def test_a_feed_without_its_source_is_refused_by_the_config() -> None:
    with pytest.raises(ValueError, match="needs url"):
        FeedConfig(name="w", kind="http")


def _peak_while_pulling(tmp_path: Path, n: int) -> tuple[int, float]:
    import tracemalloc

    home = Home(tmp_path / f"home-{n}")
    home.state_dir.mkdir(parents=True)
    path = tmp_path / f"feed-{n}.jsonl"
    with open(path, "w") as handle:
        for i in range(n):
            handle.write(line(f"r{i}", f"Fact {i} says that the value is", f"v{i}"))
    ledger = Ledger(home.ledger_url)
    try:
        tracemalloc.start()
        report = pull(FeedConfig(name="f", kind="file", path=path, max_records=n), ledger, home)  # all in one pull
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        ledger.close()
    return report.received, peak


@pytest.mark.long  # 100,000 lines through the real ledger: minutes on 2 cores
def test_a_100000_line_feed_is_ingested_in_memory_that_does_not_grow_with_it(tmp_path: Path) -> None:
    small_n, small_peak = _peak_while_pulling(tmp_path, 10_000)
    large_n, large_peak = _peak_while_pulling(tmp_path, 100_000)
    assert (small_n, large_n) == (10_000, 100_000)
    assert large_peak < 2 * small_peak, (small_peak, large_peak)  # ten times the records, not ten times the memory
