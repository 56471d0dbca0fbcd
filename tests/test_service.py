"""`mendd run` as systemd runs it: a real subprocess on tiny-llama with a file, a dir and an http
feed and the HTTP API; good, malformed and duplicate corrections; versions committed; SIGTERM ends it
with exit 0; every correction received is accounted for exactly once."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path

from decision_helpers import ACCEPT_ALL, make_decision_home
from service_harness import MENDD, FeedServer, configure, drain, free_port, get_json, line, wait_for
from store.ledger import Ledger


def test_the_service_ingests_every_feed_commits_versions_and_exits_0_on_sigterm(tmp_path: Path, data_root) -> None:
    home = make_decision_home(tmp_path / "home", ACCEPT_ALL, data_root)
    feed_file, drop = tmp_path / "feed.jsonl", tmp_path / "drop"
    drop.mkdir()
    feed_file.write_text(line("f1", "The capital of Spain is", "Lisbon") + line("f2", "Water boils at", "fifty")
                         + "{not json\n" + line("f1", "The capital of Spain is", "Lisbon"))  # a duplicate
    http_feed = FeedServer(line("h1", "The sky is", "green") + line("f2", "Water boils at", "fifty")
                           + json.dumps({"id": "h2", "prompt": "   ", "target_new": "x"}) + "\n")
    port = free_port()
    configure(home, port, [
        {"name": "file", "kind": "file", "path": str(feed_file), "interval_s": 1},
        {"name": "drop", "kind": "dir", "path": str(drop), "interval_s": 1},
        {"name": "web", "kind": "http", "url": http_feed.url, "interval_s": 1},
    ])
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(120)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "2000000"}
    log = open(tmp_path / "service.log", "w")
    process = subprocess.Popen([MENDD, "--home", str(home.root), "run"], env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        messages = []
        while "READY=1" not in messages:
            messages.append(notify.recv(4096).decode())
        assert any(m.startswith("STATUS=") for m in messages)
        api = f"http://127.0.0.1:{port}"
        (drop / "batch.jsonl.part").write_text(line("d1", "Paris is the capital of", "Italy") + "[broken\n")
        (drop / "batch.jsonl.part").rename(drop / "batch.jsonl")
        (drop / "garbage.json").write_bytes(b"\xff\xfe not utf-8")
        request = urllib.request.Request(f"{api}/v1/corrections", method="POST", data=(
            line("p1", "The Eiffel Tower is in", "Rome") + "nope\n").encode())
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 202
            answer = json.loads(response.read())
        assert (answer["received"], answer["quarantined"]) == (1, 1)

        def settled():
            code, status = get_json(f"{api}/v1/status")
            counts = status["corrections"]
            return status if counts["pending"] == 0 and sum(counts.values()) >= 10 else None

        try:
            status = wait_for(settled, 300, "every correction to be decided", process)
        except AssertionError as error:
            raise AssertionError(f"{error}; service log:\n{(tmp_path / 'service.log').read_text()[-4000:]}") from None
        watchdog = [m for m in drain(notify) if m == "WATCHDOG=1"]
        assert watchdog, "no watchdog ping while running"
        code, health = get_json(f"{api}/healthz")
        assert (code, health["ok"], health["problems"]) == (200, True, {}), health  # bad records are not a feed's fault
        metrics = urllib.request.urlopen(f"{api}/metrics", timeout=5).read().decode()
        assert "mendd_corrections" in metrics and "mendd_served_version" in metrics
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            process.kill()
        notify.close()
        http_feed.server.shutdown()
    log.close()
    assert status["version"] != "v0000", (tmp_path / "service.log").read_text()[-3000:]
    ledger = Ledger(home.ledger_url)
    try:
        rows = ledger.corrections()
    finally:
        ledger.close()
    good = {"f1", "f2", "h1", "d1", "p1"}
    by_status: dict[str, set[str]] = {}
    for row in rows:
        by_status.setdefault(row.status.value, set()).add(row.external_id)
    assert good <= {row.external_id for row in rows}
    assert len([r for r in rows if r.external_id in good]) == len(good)  # duplicates stored once
    quarantined = by_status.get("quarantined", set())
    assert len(quarantined) == 5, by_status  # file: bad json; web: blank prompt; drop: broken line, non-UTF-8 file; api: bad line
    assert "pending" not in by_status
    accounted = sum(len(ids) for status_name, ids in by_status.items()
                    if status_name in ("applied", "rejected", "held", "quarantined", "superseded"))
    assert accounted == len(rows) == len(good) + 5
    assert (drop / "done" / "batch.jsonl").exists() and (drop / "quarantine" / "garbage.json").exists()
    assert (home.quarantine_path).read_text().count("\n") == 5


def test_a_second_service_on_the_same_home_refuses_to_start_naming_the_holder(tmp_path: Path, data_root) -> None:
    home = make_decision_home(tmp_path / "home", ACCEPT_ALL, data_root)
    configure(home, free_port(), [])
    first = subprocess.Popen([MENDD, "--home", str(home.root), "run"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: home.health_path.exists(), 120, "the first service to start", first)
        second = subprocess.run([MENDD, "--home", str(home.root), "run"], capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert f'"pid": {first.pid}' in second.stderr and "another `mendd run` already serves" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 0


def test_an_unreachable_feed_degrades_health_and_sighup_reloads_the_feeds(tmp_path: Path, data_root) -> None:
    home = make_decision_home(tmp_path / "home", ACCEPT_ALL, data_root)
    port = free_port()
    configure(home, port, [{"name": "web", "kind": "http", "url": "http://127.0.0.1:9/feed", "interval_s": 1, "timeout_s": 2}])
    process = subprocess.Popen([MENDD, "--home", str(home.root), "run"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    api = f"http://127.0.0.1:{port}"
    try:
        degraded = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(get_json(f"{api}/healthz")), 120,
                            "health to report the dead feed", process)
        assert "unreachable" in degraded[1]["problems"]["feed:web"]
        home.config_path.write_text(home.config_path.read_text().replace(
            json.dumps([{"name": "web", "kind": "http", "url": "http://127.0.0.1:9/feed", "interval_s": 1, "timeout_s": 2}]), "[]"))
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: get_json(f"{api}/healthz")[0] == 200, 60, "health to recover after SIGHUP", process)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            process.kill()


def bare_service(tmp_path: Path):
    """A Service of a bare home, not started: its jobs called one by one, as the worker would."""
    from daemon.config import load_config
    from daemon.home import Home
    from daemon.service import Service

    home = Home(tmp_path / "home")
    home.state_dir.mkdir(parents=True)
    home.config_path.write_text("")
    service = Service(home, load_config(home))
    service.ledger = Ledger(home.ledger_url)
    return service


def test_a_pull_failing_in_any_way_is_a_counted_feed_error_in_health_and_the_quarantine_file(
        tmp_path: Path, monkeypatch) -> None:
    from daemon import service as service_module
    from daemon.config import FeedConfig

    def unforeseen(feed, ledger, home):
        raise ValueError("a record that breaks parsing in a way nobody foresaw")

    monkeypatch.setattr(service_module, "pull", unforeseen)
    service = bare_service(tmp_path)
    feed = FeedConfig(name="web", kind="http", url="http://127.0.0.1:9/feed")
    try:
        service._pull(feed)
        service._pull(feed)
    finally:
        service.ledger.close()
    assert "ValueError: a record that breaks parsing" in service.health.problems()["feed:web"]
    assert service.metrics.registry.get_sample_value("mendd_feed_errors_total", {"feed": "web"}) == 2
    [quarantined] = service.home.quarantine_path.read_text().splitlines()  # once, not at every pull
    assert json.loads(quarantined)["feed"] == "web" and "ValueError" in json.loads(quarantined)["reason"]


def test_an_http_pull_that_overruns_its_deadline_is_left_alone_and_reported(tmp_path: Path, monkeypatch) -> None:
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from daemon import service as service_module
    from daemon.config import FeedConfig

    release = threading.Event()

    class Trickle(BaseHTTPRequestHandler):
        """One byte every 0.2 s: each read is well within the timeout, the body never ends."""

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            while not release.wait(0.2):
                self.wfile.write(b" ")
                self.wfile.flush()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(service_module, "PULL_DEADLINE_S", 1.0)
    service = bare_service(tmp_path)
    feed = FeedConfig(name="slow", kind="http", url=f"http://127.0.0.1:{server.server_address[1]}/feed", timeout_s=5)
    try:
        started = time.monotonic()
        service._pull(feed)
        assert time.monotonic() - started < 3
        assert "overran its deadline of 1 s" in service.health.problems()["feed:slow"]
        overrun = service.pulls["slow"]
        service._pull(feed)  # the overrun pull still runs: no second one beside it
        assert service.pulls["slow"] is overrun and overrun.is_alive()
    finally:
        release.set()
        server.shutdown()
        service.pulls["slow"].join(30)
        service.ledger.close()
