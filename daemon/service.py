"""`mendd run`: the maintenance service.

One process, one APScheduler 3.x scheduler with a single worker thread, so jobs never overlap:
each feed is pulled on its interval, a cycle runs when enough corrections are pending (or the
oldest has waited long enough), and a tick settles reviews tagged in the MLflow UI, notices an
operator's `dvc checkout`, and refreshes health. Each job, and the startup, runs on a thread of its
own that ends with it (daemon/compute.py says why). The main thread only waits for signals and
pings systemd's watchdog.

SIGTERM/SIGINT: the running job finishes (a cycle stops between decisions; undecided corrections
stay pending), then the process exits 0. SIGHUP: feeds and policy are read again.
"""
from __future__ import annotations

import faulthandler
import fcntl
import json
import logging
import os
import signal
import socket
import threading
import time
from datetime import datetime, timezone

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from daemon import systemd
from daemon.config import MenddConfig, load_config
from daemon.answering import Answering, Snapshot
from daemon.compute import on_own_thread, on_own_thread_each_call
from daemon.cycle import rejudge_on_head, run_cycle
from daemon.feeds import FeedError, pull
from daemon.health import Health, describe_failure
from daemon.home import Home
from daemon.http_api import Api, serve
from daemon.metrics import Metrics
from daemon.review import settle_tagged
from daemon.runtime import Runtime
from daemon.status import snapshot
from daemon.versioning import Versions, home_lock, recover, served_version
from policies.policy import load_policy
from store.errors import StoreError
from store.ledger import Ledger
from store.versions import tag_number

log = logging.getLogger("mendd.service")


class _SkippedRunsFilter(logging.Filter):
    """With one worker, a job due while another runs is skipped by design; APScheduler would warn of
    it every second of a long cycle."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances reached" not in record.getMessage()


logging.getLogger("apscheduler.scheduler").addFilter(_SkippedRunsFilter())
TICK_S = 5.0


class ServiceLockError(StoreError):
    """Another `mendd run` serves this home."""


def served_snapshot(rt: Runtime) -> Snapshot:
    """What answers read of the version `rt` serves (their own copy of the model)."""
    return Snapshot.of(rt.served.tag, rt.editable, rt.memory)


def acquire_service_lock(home: Home):
    """Hold the home's service lock for this process's life; refuse, naming the holder, if taken."""
    home.state_dir.mkdir(parents=True, exist_ok=True)
    handle = open(home.service_lock_path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "an unknown process"
        handle.close()
        raise ServiceLockError(f"another `mendd run` already serves {home.root}: {holder}; stop it first") from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started_at": datetime.now(timezone.utc).isoformat()}))
    handle.flush()
    return handle


class Service:
    def __init__(self, home: Home, config: MenddConfig):
        self.home, self.config = home, config
        self.health = Health()
        self.metrics = Metrics()
        self.stopping = threading.Event()
        self.reload_asked = threading.Event()
        self.rt: Runtime | None = None
        # The HTTP threads' and the feed pulls' one ledger: its engine pools their connections.
        self.ledger: Ledger | None = None
        self.unsettled = False  # the last cycle failed: recover the store before the next one
        self.scheduler: BackgroundScheduler | None = None
        self.answers: Answering | None = None  # the OpenAI-compatible endpoint's snapshot and worker

    # -- life ---------------------------------------------------------------------------------

    def run(self) -> int:
        lock = acquire_service_lock(self.home)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        signal.signal(signal.SIGHUP, lambda *_: self.reload_asked.set())
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1`: every thread's stack, to the log
        try:
            systemd.notify("STATUS=loading the model, editor and suites")
            self.rt, first = on_own_thread(self._open, "mendd-startup")
            self.ledger = Ledger(self.home.ledger_url)
            self.answers = Answering(first)
            http = serve(Api(self.health, self.status, self.metrics.registry, self.ledger, self.home,
                             self.config.http.token.get_secret_value() if self.config.http.token else None,
                             self.answers, self.config.model),
                         self.config.http.host, self.config.http.port)
            self.scheduler = BackgroundScheduler(
                executors={"default": ThreadPoolExecutor(1)},
                job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": None}, timezone="UTC")
            self._schedule()
            self.scheduler.start()
            on_own_thread(self._tick, "mendd-tick")
            systemd.notify("READY=1")
            systemd.notify(f"STATUS=serving {self.rt.served.tag}")
            log.info("serving %s; http on %s:%s", self.rt.served.tag, self.config.http.host, self.config.http.port)
            ping = systemd.watchdog_interval()
            while not self.stopping.wait(timeout=min(ping or 1.0, 1.0)):
                if ping:
                    systemd.notify("WATCHDOG=1")
                if self.reload_asked.is_set():
                    self.reload_asked.clear()
                    self.scheduler.add_job(on_own_thread_each_call(self._reload, "mendd-reload"), id="reload",
                                           replace_existing=True)
            systemd.notify("STOPPING=1")
            log.info("stopping: finishing the current step")
            self.scheduler.shutdown(wait=True)
            http.shutdown()
            self.answers.close()
            self._write_health()
            return 0
        finally:
            if self.ledger is not None:
                self.ledger.close()
            if self.rt is not None:
                self.rt.close()
            lock.close()

    def _open(self) -> tuple[Runtime, Snapshot]:
        """The runtime and the first snapshot answers come from."""
        with home_lock(self.home):
            rt = Runtime.open(self.home, self.config)
        return rt, served_snapshot(rt)

    def _schedule(self) -> None:
        # Each job on a fresh thread: the scheduler's worker outlives its jobs, and an idle thread
        # that has run torch slows every other one (daemon/compute.py).
        for feed in self.config.feeds:
            self.scheduler.add_job(on_own_thread_each_call(self._pull, "mendd-pull"), "interval",
                                   seconds=feed.interval_s, args=[feed], id=f"feed:{feed.name}",
                                   next_run_time=datetime.now(timezone.utc), replace_existing=True)
        self.scheduler.add_job(on_own_thread_each_call(self._maybe_cycle, "mendd-cycle"), "interval",
                               seconds=self.config.cycle.check_interval_s, id="cycle", replace_existing=True)
        self.scheduler.add_job(on_own_thread_each_call(self._tick, "mendd-tick"), "interval", seconds=TICK_S,
                               id="tick", replace_existing=True)

    # -- jobs (one at a time, on the scheduler's worker) ---------------------------------------

    def _pull(self, feed) -> None:
        try:
            report = pull(feed, self.ledger, self.home)
            self.health.clear(f"feed:{feed.name}")
            if report.received or report.quarantined:
                log.info("feed %s: %d received, %d duplicates, %d quarantined", feed.name, report.received,
                         report.duplicates, report.quarantined)
        except FeedError as error:
            self.metrics.feed_errors.labels(feed.name).inc()
            self.health.degrade(f"feed:{feed.name}", str(error))
            log.warning("%s", error)

    def _maybe_cycle(self) -> None:
        ledger = self.rt.records.versions.ledger
        while not self.stopping.is_set():
            try:
                waiting = ledger.pending(self.config.cycle.min_pending)
                if not waiting:
                    return
                waited = (datetime.now(timezone.utc) - waiting[0].received_at).total_seconds()
                if len(waiting) < self.config.cycle.min_pending and waited < self.config.cycle.max_wait_s:
                    return
                with home_lock(self.home):
                    if self.unsettled:  # a failed cycle may have left a commit half-way: undo or finish it first
                        recover(self.rt.records.versions)
                        self.unsettled = False
                    systemd.notify(f"STATUS=cycle: {len(waiting)}+ corrections pending on {self.rt.served.tag}")
                    report = run_cycle(self.rt, should_stop=self.stopping.is_set)
            except Exception as error:  # the service stays up; the corrections stay pending; the next check retries
                self.unsettled = True
                self.health.degrade("cycle", describe_failure(error))
                self.metrics.cycle_failures.inc()
                log.exception("cycle failed")
                return
            self.health.clear("cycle")
            self._publish()
            self.metrics.observe_cycle(report)
            systemd.notify(f"STATUS=serving {self.rt.served.tag}")
            log.info("cycle %d: %s; serving %s", report.cycle_id, report.outcome, report.version)

    def _tick(self) -> None:
        """Settle tagged reviews, follow an operator's checkout, refresh health and metrics."""
        try:
            with home_lock(self.home):
                settled = settle_tagged(self.rt.records, rejudge_on_head(self.rt))
                changed = served_version(self.rt.records.versions, self.rt.served)
                if changed is not None:
                    log.info("the store now holds %s (was serving %s): reloading", changed.tag, self.rt.served.tag)
                    self.rt.load(changed)
            self._publish()
            for run_id, action, _ in settled:
                log.info("review of %s: %s", run_id, action)
            self.metrics.observe_ledger(self.rt.records.versions.ledger.counts())
            self.health.clear("tick")
        except Exception as error:
            self.health.degrade("tick", describe_failure(error))
            log.warning("tick failed: %s", error)
        self.metrics.version.set(tag_number(self.rt.served.tag))
        self.metrics.healthy.set(1 if self.health.ok else 0)
        self._write_health()

    def _reload(self) -> None:
        """SIGHUP: read the config again; new feeds and policy take effect, the rest needs a restart."""
        try:
            config = load_config(self.home)
            policy = load_policy(config.policy)
        except Exception as error:
            self.health.degrade("reload", f"kept the old settings: {error}")
            log.error("reload failed, kept the old settings: %s", error)
            return
        for job in self.scheduler.get_jobs():
            if job.id.startswith("feed:"):
                job.remove()
                self.health.clear(job.id)  # a removed feed's trouble is no longer ours
        self.config = self.config.model_copy(update={"feeds": config.feeds, "policy": config.policy})
        self.rt.use_policy(policy)
        self._schedule()
        self.health.clear("reload")
        log.info("reloaded: %d feeds, policy %s", len(config.feeds), policy.source)

    def _publish(self) -> None:
        """Answers follow the served version (on this worker, between jobs: the model is as served)."""
        if self.answers is not None and self.answers.snapshot.version != self.rt.served.tag:
            self.answers.publish(served_snapshot(self.rt))

    # -- shared -------------------------------------------------------------------------------

    def status(self) -> dict:
        versions = Versions(self.rt.records.versions.store, self.ledger)
        state = snapshot(versions, {"ok": self.health.ok, "problems": self.health.problems()},
                         [f.name for f in self.config.feeds])
        return {**state, "serving": self.rt.served.tag, "pid": os.getpid()}

    def _write_health(self) -> None:
        try:
            self.health.write(self.home.health_path, {"serving": self.rt.served.tag if self.rt else None,
                                                      "at": time.time()})
        except OSError as error:
            log.warning("cannot write %s: %s", self.home.health_path, error)
