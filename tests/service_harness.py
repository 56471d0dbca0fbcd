"""`mendd run` as a real subprocess, the feeds it reads, and the audit of a home after it stopped
(or was killed): shared by the service tests, the fault tests and bench/reliability.py."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from safetensors import safe_open

from daemon import tracking
from daemon.config import load_config
from daemon.home import Home
from daemon.mlflow_ui import start_server, stop_server, ui_command
from daemon.versioning import changing
from decision_helpers import ACCEPT_ALL, HOLD_ALL, make_decision_home
from store.crash import APPROVAL_COMMITTED, COMMIT_POINTS, DVC_ADDED, HELD_SAVED, SERVICE_POINTS, TAGGED
from store.ledger_schema import CorrectionStatus
from store.lineage import applied_twice, in_effect
from store_helpers import store_is_clean, tool

MENDD = str(Path(sys.executable).with_name("mendd"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def line(cid: str, prompt: str, target: str) -> str:
    return json.dumps({"id": cid, "prompt": prompt, "target_new": target}) + "\n"


class FeedServer:
    """A correction feed over HTTP that honours If-None-Match, as a real producer would; it can be
    stopped and started again on the same port (a producer's outage)."""

    def __init__(self, body: str, port: int = 0):
        self.body, self.requests = body.encode(), 0
        self.server = self._serve(port)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/feed.jsonl"

    def _serve(self, port: int) -> ThreadingHTTPServer:
        feed = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                feed.requests += 1
                etag = f'"{hash(feed.body)}"'
                if self.headers.get("If-None-Match") == etag:
                    self.send_response(304)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("ETag", etag)
                self.send_header("Content-Length", str(len(feed.body)))
                self.end_headers()
                self.wfile.write(feed.body)

        server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def restart(self) -> None:
        self.server = self._serve(self.server.server_address[1])


def get_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait_for(predicate, seconds: float, what: str, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"mendd run exited early ({process.returncode}) while waiting for {what}")
        try:
            value = predicate()
            if value:
                return value
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def configure(home: Home, port: int, feeds: list[dict], **replace: str) -> None:
    """The home's HTTP port and feeds, a 1 s cycle check, and any other `old=new` text replacements."""
    text = home.config_path.read_text().replace("port: 8742", f"port: {port}")
    text = text.replace("feeds: []", "feeds: " + json.dumps(feeds))
    text = text.replace("check_interval_s: 10.0", "check_interval_s: 1.0")
    for old, new in replace.items():
        assert old in text, f"{old!r} is not in mendd.yaml"
        text = text.replace(old, new)
    home.config_path.write_text(text)


def start_service(home: Home, log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    log = open(log_path, "a")
    try:
        return subprocess.Popen([MENDD, "--home", str(home.root), "run"], env={**os.environ, **(env or {})},
                                stdout=log, stderr=subprocess.STDOUT, text=True)
    finally:
        log.close()  # the child holds its own copy


def drain(sock: socket.socket) -> list[str]:
    sock.settimeout(0.1)
    out = []
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except (TimeoutError, socket.timeout, BlockingIOError):
        return out


@dataclass
class Audit:
    """What a home holds after a stop: the problems found, as words."""

    lost: list[str] = field(default_factory=list)  # corrections sent but not in the ledger
    duplicated: list[str] = field(default_factory=list)  # corrections whose change the model holds twice
    corrupted: list[str] = field(default_factory=list)  # store or ledger not one consistent version
    statuses: Counter = field(default_factory=Counter)
    head: str = ""


def audit(home: Home, sent: list[str], feed: str | None = None) -> Audit:
    """Recover the home as a restart does, then check it: the store's HEAD is a tagged version,
    `dvc status` and `git status` are clean, every tensor file reads, the ledger records every
    version and carries exactly the corrections the head does, no correction's change is in the model
    twice (two edits, or two memory entries), and each correction in `sent` (ids that reached the
    ledger's feed `feed`, or any feed) is stored."""
    found = Audit()
    with changing(home, load_config(home)) as (versions, _recovery):
        store, ledger = versions.store, versions.ledger
        head = store.head()
        found.head = head.tag
        if tool(home.store_dir, "git", "describe", "--exact-match", "--tags", "HEAD").stdout.strip() != head.tag:
            found.corrupted.append(f"HEAD is not tagged {head.tag}")
        if not store_is_clean(home.store_dir):
            found.corrupted.append("dvc status / git status not clean: " + tool(home.store_dir, "dvc", "status").stdout.strip())
        for path in sorted(store.model_dir.glob("*.safetensors")):
            try:
                with safe_open(str(path), "pt") as handle:
                    for key in handle.keys():
                        handle.get_tensor(key)
            except Exception as error:  # noqa: BLE001 - any unreadable file is corruption
                found.corrupted.append(f"{path.name}: {error}")
        history = store.versions()
        tags = [v.tag for v in history]
        if ledger.recorded_tags() != tags:
            found.corrupted.append(f"ledger records {ledger.recorded_tags()}, the store has {tags}")
        rows = ledger.corrections()
        carried = in_effect(history, head.tag)
        applied = {r.external_id: r.version for r in rows if r.status == CorrectionStatus.applied and r.version}
        held = [r for r in rows if r.status == CorrectionStatus.held]
        waiting = {run.info.run_id for run in held_runs_of(home)} if held else set()  # MLflow only when needed
        found.corrupted += [f"{r.external_id} is held by run {r.run_id}, which waits for no review or lacks its candidate"
                            for r in held if r.run_id not in waiting or not (home.held_dir / f"{r.run_id}.safetensors").exists()]
        if applied != carried:
            found.corrupted.append(f"ledger applied {sorted(applied)} but {head.tag} carries {sorted(carried)}")
        # Applied twice: the change is in the model twice (the ledger's unique ids cannot show it).
        found.duplicated = applied_twice(history, head.tag)
        entries = Counter(cid for _, chunk in store.memory_chunks() for share in chunk.shares for cid in share.correction_ids)
        found.duplicated += sorted(f"{cid} (memory entries: {n})" for cid, n in entries.items() if n > 1)
        stored = {r.external_id for r in rows if feed is None or r.feed == feed}
        found.lost = sorted(set(sent) - stored)
        found.statuses = Counter(r.status.value for r in rows)
    return found


@dataclass
class KillReport:
    kills: int = 0  # rounds that ended in a SIGKILL at the moment meant: its crash point, or a random one
    by_moment: Counter = field(default_factory=Counter)  # "<mode> at <crash point or random>", with how the round ended
    problems: list[str] = field(default_factory=list)  # every audit finding, with its round
    unkilled: list[str] = field(default_factory=list)  # rounds that did not end in the SIGKILL meant, and how
    sent: list[str] = field(default_factory=list)
    malformed: int = 0
    final: Audit | None = None


# A round's service decides under one of three modes: `accept` commits every edit; `hold` holds
# every one for review; `approve` holds them too, and a reviewer has tagged every held run for
# approval before the start (the service's first tick approves them, so the commit points then
# fall in an approval). `held` is a random moment after the round's first new held decision.
KILL_SCHEDULE = (*((point, "accept") for point in (*SERVICE_POINTS, *COMMIT_POINTS)),
                 (HELD_SAVED, "hold"), ("held", "hold"), (APPROVAL_COMMITTED, "approve"), ("held", "hold"),
                 (TAGGED, "approve"), ("held", "hold"), (DVC_ADDED, "approve"), ("random", "approve"),
                 ("random", "accept"))


def kill_rounds(home: Home, feed_file: Path, log_path: Path, rounds: int,
                schedule: tuple[tuple[str, str], ...] = KILL_SCHEDULE, seed: int = 0, say=lambda _text: None) -> KillReport:
    """Kill -9 `mendd run` `rounds` times while it pulls a growing file feed, decides, holds and
    approves: at each (crash point, mode) of `schedule` in turn (the process kills itself there), and
    at random moments; audit the home after each kill; then let one run accept or approve everything
    and audit again."""
    import random

    from store.crash import CRASH_ENV, reached

    rng = random.Random(seed)
    report = KillReport()
    for number in range(rounds):
        with open(feed_file, "a", encoding="utf-8") as handle:
            for k in range(3):
                cid = f"r{number}-{k}"
                handle.write(line(cid, f"Fact {number}.{k}: the answer to question {number * 3 + k} is", f"word{number}{k}"))
                report.sent.append(cid)
            if number % 5 == 4:
                handle.write("{ broken json\n")
                report.malformed += 1
        moment, mode = schedule[number % len(schedule)]
        (home.root / "policy.yaml").write_text(ACCEPT_ALL if mode == "accept" else HOLD_ALL)
        if mode == "approve":
            approve_every_held(home)
        env = {} if moment in ("random", "held") else {CRASH_ENV: moment}
        logged = log_path.stat().st_size if log_path.exists() else 0
        held_before = _counts(home).get("held", 0)
        process = start_service(home, log_path, env)
        ended = kill_at(process, "random" if moment == "held" else moment, rng,
                        (lambda: _counts(home).get("held", 0) > held_before) if moment == "held" else lambda: True)
        said = log_path.read_bytes()[logged:].decode(errors="replace")
        if ended == "killed" and moment not in ("random", "held") and reached(moment) not in said:
            ended = "killed by SIGKILL without reaching its crash point"
        moment = f"{mode} at {moment}"
        if ended == "killed":
            report.kills += 1
        else:
            report.unkilled.append(f"round {number} ({moment}): {ended}")
            moment = f"{moment} ({ended})"
        report.by_moment[moment] += 1
        found = audit(home, [])
        report.problems += [f"round {number} ({moment}): {p}" for p in found.corrupted + found.duplicated]
        say(f"round {number}: killed {moment}; head {found.head}; {dict(found.statuses)}")
    (home.root / "policy.yaml").write_text(ACCEPT_ALL)  # new decisions are committed, so none is held
    approve_every_held(home)
    process = start_service(home, log_path)
    try:
        wait_for(lambda: _all_decided(home, len(report.sent) + report.malformed), 600, "every correction to be decided", process)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    report.final = audit(home, report.sent)
    report.problems += [f"final: {p}" for p in report.final.corrupted + report.final.duplicated]
    return report


def held_runs_of(home: Home) -> list:
    """The home's held MLflow runs that wait for review."""
    config = load_config(home)
    client = tracking.client(config.mlflow.tracking_uri)
    experiment = tracking.experiment_id(client, tracking.experiment_name(config.mlflow.experiment, config.model),
                                        home.mlflow_artifacts)
    return tracking.held_runs(client, experiment)


def approve_every_held(home: Home) -> None:
    """Tag every waiting held run for approval, as a reviewer does in the MLflow UI (the service's
    tick acts on it)."""
    client = tracking.client(load_config(home).mlflow.tracking_uri)
    for run in held_runs_of(home):
        if run.data.tags.get(tracking.REVIEW_TAG) != "approve":
            client.set_tag(run.info.run_id, tracking.REVIEW_TAG, "approve")


def kill_at(process: subprocess.Popen, moment: str, rng, ready=lambda: True) -> str:
    """Let `process` run to `moment` and see it die by SIGKILL there: "killed", else how it ended.
    At a crash point the service kills itself; at "random" the test kills it a random wait after
    `ready()` first holds (asked about once a second, for at most 120 s), and a service that had
    already exited is a failure, not a kill."""
    if moment == "random":
        deadline = time.monotonic() + 120
        while not (was_ready := ready()) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
        if was_ready and process.poll() is None:
            time.sleep(rng.uniform(0.5, 12.0))
        if process.poll() is not None:
            return f"exited by itself with code {process.returncode} before the random kill"
        process.send_signal(signal.SIGKILL)
        process.wait()
        return "killed" if was_ready else "not ready in 120 s"
    try:
        code = process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return "crash point not reached in 120 s"
    return "killed" if code == -signal.SIGKILL else f"exited with code {code} before its crash point"


def _all_decided(home: Home, expected: int) -> bool:
    counts = _counts(home)
    return counts.get("pending", 0) == 0 and counts.get("held", 0) == 0 and sum(counts.values()) >= expected


def _counts(home: Home) -> dict[str, int]:
    from store.ledger import Ledger

    ledger = Ledger(home.ledger_url)
    try:
        return ledger.counts()
    finally:
        ledger.close()


def post_corrections(api: str, body: str) -> dict:
    code, answer = post_status(api, body)
    assert code == 202, (code, answer)
    return answer


def post_status(api: str, body: str) -> tuple[int, dict]:
    request = urllib.request.Request(f"{api}/v1/corrections", method="POST", data=body.encode())
    try:
        with urllib.request.urlopen(request, timeout=90) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def problems(api: str) -> dict[str, str]:
    """/healthz's problems (empty when it answers 200)."""
    code, body = get_json(f"{api}/healthz")
    return {} if code == 200 else body.get("problems", {"healthz": f"HTTP {code}"})


def start_mlflow_server(home: Home, port: int) -> subprocess.Popen:
    """A real `mlflow server` on the home's database, as `mendd ui` starts it; waits until it answers."""
    command = ui_command(home, load_config(home), "127.0.0.1", port)
    process = start_server(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200, 120,
                 "the MLflow server", process)
    except BaseException:
        stop_server(process)
        raise
    return process


@dataclass
class SmallDisk:
    """A home's store moved onto its own small tmpfs, which can be filled up or made read-only."""

    path: Path

    @classmethod
    def around(cls, store: Path, size_mb: int) -> "SmallDisk":
        saved = store.with_name(store.name + ".saved")
        store.rename(saved)
        store.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(store)], check=True,
                       capture_output=True)
        subprocess.run(["cp", "-a", f"{saved}/.", str(store)], check=True)
        return cls(store)

    @staticmethod
    def available() -> bool:
        probe = Path("/tmp") / f"mendd-mount-probe-{os.getpid()}"
        probe.mkdir(exist_ok=True)
        try:
            mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True)
            if mounted.returncode != 0:
                return False
            subprocess.run(["umount", str(probe)], check=True)
            return True
        finally:
            probe.rmdir()

    def fill(self, leave_bytes: int) -> Path:
        """Fill the disk until `leave_bytes` are free; returns the filler file."""
        filler = self.path / ".git" / "test-filler"  # inside .git: git status does not see it
        free = os.statvfs(self.path).f_bavail * os.statvfs(self.path).f_frsize
        with open(filler, "wb") as handle:
            handle.truncate(0)
            chunk = b"\0" * (1 << 20)
            remaining = max(free - leave_bytes, 0)
            while remaining > 0:
                handle.write(chunk[: min(remaining, len(chunk))])
                remaining -= len(chunk)
        return filler

    def read_only(self, on: bool) -> None:
        subprocess.run(["mount", "-o", f"remount,{'ro' if on else 'rw'}", str(self.path)], check=True, capture_output=True)

    def release(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


# -- faults: each scenario takes a factory of Running services --------------------------------

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

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            assert self.process.wait(timeout=120) == 0, self.log.read_text()[-3000:]

    def assert_whole(self, sent: list[str]) -> None:
        found = audit(self.home, sent)
        assert (found.lost, found.duplicated, found.corrupted) == ([], [], []), found
        assert found.statuses["pending"] == 0 and found.head != "v0000", found



def pending_ids(running: Running) -> list[str]:
    from store.ledger import Ledger
    from store.ledger_schema import CorrectionStatus

    ledger = Ledger(running.home.ledger_url)
    try:
        return [row.external_id for row in ledger.corrections(CorrectionStatus.pending)]
    finally:
        ledger.close()



def ledger_locked(service) -> None:
    """Another process holds the ledger's write lock while a correction waits."""
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
        assert pending_ids(running) == ["k1"]
        refused = post_status(running.api, line("k2", "Water boils at", "fifty"))
        assert refused[0] == 503 and "send the whole request again" in refused[1]["error"]["message"], refused
    finally:
        locker.kill()
        locker.wait()
    assert post_corrections(running.api, line("k2", "Water boils at", "fifty"))["received"] == 1
    running.recovered()
    wait_for(lambda: pending_ids(running) == [], 180, "k1 and k2 to be decided", running.process)
    running.stop()
    running.assert_whole(["k1", "k2"])



def tracking_server_goes_away(service) -> None:
    """The MLflow server stops while a correction arrives, and comes back."""
    mlflow_port = free_port()
    running = service(**{"tracking_uri: null": f'tracking_uri: "http://127.0.0.1:{mlflow_port}"'})
    server = start_mlflow_server_for(running, mlflow_port)
    try:
        running.start()
        stop_server(server)
        post_corrections(running.api, line("m1", "The capital of Spain is", "Lisbon"))
        reason = running.degraded("cycle")
        assert "127.0.0.1" in reason or "Connection" in reason, reason
        assert pending_ids(running) == ["m1"]  # nothing decided without its record
        server = start_mlflow_server_for(running, mlflow_port)
        running.recovered()
        running.stop()
    finally:
        stop_server(server)
    running.assert_whole(["m1"])



def start_mlflow_server_for(running: Running, port: int):
    """The MLflow server on the home's own database (mendd.yaml names the server, not the file)."""
    text = running.home.config_path.read_text()
    running.home.config_path.write_text(text.replace(f'tracking_uri: "http://127.0.0.1:{port}"', "tracking_uri: null"))
    try:
        return start_mlflow_server(running.home, port)
    finally:
        running.home.config_path.write_text(text)



def feed_server_goes_away(service) -> None:
    """An HTTP feed's server stops, and comes back with one more correction."""
    feed = FeedServer(line("w1", "The capital of Spain is", "Lisbon"))
    running = service(feeds=[{"name": "web", "kind": "http", "url": feed.url, "interval_s": 1, "timeout_s": 2}]).start()
    feed.stop()
    feed.body = (line("w1", "The capital of Spain is", "Lisbon") + line("w2", "Water boils at", "fifty")).encode()
    assert "unreachable" in running.degraded("feed:web")
    feed.restart()
    running.recovered()
    wait_for(lambda: pending_ids(running) == [] and feed.requests > 1, 180, "w2 to be pulled and decided", running.process)
    running.stop()
    feed.stop()
    running.assert_whole(["w1", "w2"])



def store_disk_fault(service, fault: str) -> None:
    """The store's own disk fills up (`full`) or turns read-only (`read-only`) while a commit is due."""
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
        # Full: one phrase whichever step ran out of room (git says "Out of diskspace", the OS "No space left").
        assert reason.startswith("disk full: ") if fault == "full" else ("Read-only" in reason), reason
        assert pending_ids(running) == ["d1"]
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


# -- a hostile producer: records and ids meant to break intake or history -------------------------

HOSTILE_IDS = ("c1\nmendd-version: {\"tag\": \"v9999\", \"kind\": \"base\", \"model_md5\": \"forged\"}", "c2\x00",
               "c3\x1b[2J", "c4\x1e\x1f", "x" * 129, "../../etc/passwd; rm -rf /", " ")


def hostile_producer(service) -> dict:
    """A file feed and POSTs carrying what no producer should send (ids that would forge or break
    history, a 5,000-digit integer, a line over max_bytes, a half-written last line, a file rewritten
    in place), each followed by good records: every good record arrives and is decided once, every bad
    one is quarantined with its reason, the feed never stops, and history reads whole. Returns the
    counts it checked."""
    feed = Path(tempfile.mkdtemp(prefix="mendd-hostile-")) / "hostile.jsonl"
    feed.write_text("")
    running = service(feeds=[{"name": "file", "kind": "file", "path": str(feed), "interval_s": 1, "max_bytes": 65536}]).start()
    good: list[str] = []

    def arrive(cid: str) -> None:
        good.append(cid)
        wait_for(lambda: cid in stored_ids(running.home), 120, f"{cid} to be stored (the feed moved on)", running.process)

    bad_lines = [json.dumps({"id": cid, "prompt": f"Bad record {i} is", "target_new": "bad"}) + "\n"
                 for i, cid in enumerate(HOSTILE_IDS)]
    bad_lines += ['{"id": "big", "prompt": "a", "target_new": "b", "n": ' + "9" * 5000 + "}\n",
                  json.dumps({"id": "long", "prompt": "x" * 70_000, "target_new": "y"}) + "\n", "{ broken\n"]
    with open(feed, "a", encoding="utf-8") as handle:
        handle.writelines(bad_lines)
        handle.write(line("g1", "The capital of Spain is", "Lisbon"))
    arrive("g1")
    half = line("g2", "Water boils at", "fifty")
    with open(feed, "a", encoding="utf-8") as handle:  # a producer caught mid-write
        handle.write(half[:17])
    time.sleep(3)  # several pulls see the half line
    with open(feed, "a", encoding="utf-8") as handle:
        handle.write(half[17:])
    arrive("g2")
    with open(feed, "r+", encoding="utf-8") as handle:  # rewritten in place, regrown past the old cursor
        handle.truncate(0)
        handle.write(line("g3", "The sky is", "green") * 1 + line("g4", "Grass is", "blue") * 1 + " " * 5000 + "\n")
    arrive("g3")
    arrive("g4")
    for cid in HOSTILE_IDS:
        code, _ = post_status(running.api, json.dumps({"id": cid, "prompt": f"Bad post {cid!r} is", "target_new": "bad"}))
        assert code in (202, 400), code
    post_corrections(running.api, line("g5", "Rome is in", "Peru"))
    arrive("g5")
    wait_for(lambda: pending_ids(running) == [], 300, "every good record to be decided", running.process)
    versions = subprocess.run([MENDD, "--home", str(running.home.root), "versions", "--json"], capture_output=True, text=True)
    assert versions.returncode == 0, versions.stderr
    tags = [v["tag"] for v in json.loads(versions.stdout)["versions"]]
    assert "v9999" not in tags and tags == sorted(tags), tags
    quarantined = _counts(running.home).get("quarantined", 0)
    assert problems(running.api) == {}, problems(running.api)  # bad records are not a stopped feed
    running.stop()
    running.assert_whole(good)
    return {"good_records": len(good), "bad_records": len(bad_lines) + len(HOSTILE_IDS), "quarantined": quarantined,
            "versions": len(tags)}


def stored_ids(home: Home) -> set[str]:
    from store.ledger import Ledger

    ledger = Ledger(home.ledger_url)
    try:
        return {row.external_id for row in ledger.corrections()}
    finally:
        ledger.close()
