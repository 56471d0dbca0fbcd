"""`mendd run`: the maintenance service.

One process, one APScheduler 3.x scheduler with a single worker thread, so jobs never overlap:
each feed is pulled on its interval, a cycle runs when enough corrections are pending (or the
oldest has waited long enough), and a tick settles reviews tagged in the MLflow UI, notices an
operator's `dvc checkout`, and refreshes health. Each job, and the startup, runs on a thread of its
own that ends with it (daemon/compute.py says why). The main thread only waits for signals and
pings systemd's watchdog, and only while the worker shows progress (daemon/health.py): each job
has a bound, and a worker past it is left to the watchdog, which restarts the service.

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
from datetime import datetime, timezone

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from daemon import systemd
from daemon.answering import Answering, Snapshot
from daemon.compute import on_own_thread, on_own_thread_each_call
from daemon.config import MenddConfig, load_config
from daemon.cycle import rejudge_on_head, run_cycle
from daemon.feeds import FeedError, quarantine_line, pull
from daemon.health import Health, describe_failure
from daemon.home import Home
from daemon.home_lock import home_lock
from daemon.http_api import Api, serve
from daemon.metrics import Metrics
from daemon.review import Settled, settle_tagged
from daemon.runtime import Runtime
from daemon.status import snapshot
from daemon.versioning import Versions, recover, served_version
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
# requests' timeout bounds each read of an HTTP feed, not the pull: a server trickling bytes could
# hold the worker for ever. The worker waits this long for a pull, then leaves it to run alone.
PULL_DEADLINE_S = 300.0
# Longest a tick, a reload or one decision of a cycle may go without progress: each may commit a
# version, which runs git (600 s at most, store/git.py) and a DVC push (900 s, store/dvcrepo.py).
STEP_BOUND_S = 1800.0
MAX_REASON = 1000  # a database error quotes its statement; health needs the start of it


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
        self.pulls: dict[str, threading.Thread] = {}  # each feed's latest pull, which may have overrun

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
            self._job(self._tick, "tick", STEP_BOUND_S)()  # before the scheduler's jobs: one job at a time
            self.scheduler.start()
            systemd.notify("READY=1")
            systemd.notify(f"STATUS=serving {self.rt.served.tag}")
            log.info("serving %s; http on %s:%s", self.rt.served.tag, self.config.http.host, self.config.http.port)
            ping = systemd.watchdog_interval()
            while not self.stopping.wait(timeout=min(ping or 1.0, 1.0)):
                if ping and self.health.stuck() is None:
                    systemd.notify("WATCHDOG=1")
                if self.reload_asked.is_set():
                    self.reload_asked.clear()
                    self.scheduler.add_job(self._job(self._reload, "reload", STEP_BOUND_S), id="reload",
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
        for feed in self.config.feeds:
            self.scheduler.add_job(self._job(self._pull, f"feed:{feed.name}", PULL_DEADLINE_S + TICK_S), "interval",
                                   seconds=feed.interval_s, args=[feed], id=f"feed:{feed.name}",
                                   next_run_time=datetime.now(timezone.utc), replace_existing=True)
        self.scheduler.add_job(self._job(self._maybe_cycle, "cycle", STEP_BOUND_S), "interval",
                               seconds=self.config.cycle.check_interval_s, id="cycle", replace_existing=True)
        self.scheduler.add_job(self._job(self._tick, "tick", STEP_BOUND_S), "interval", seconds=TICK_S,
                               id="tick", replace_existing=True)

    def _job(self, work, name: str, bound_s: float):
        """`work` as a job of the worker: on a fresh thread (the scheduler's worker outlives its jobs,
        and an idle thread that has run torch slows every other one: daemon/compute.py), watched by
        health for progress within `bound_s`, with the health file written as it starts and ends."""
        run = on_own_thread_each_call(work, f"mendd-{name}")

        def job(*args) -> None:
            with self.health.job(name, bound_s):
                self._write_health()
                run(*args)
            self._write_health()
        return job

    # -- jobs (one at a time, on the scheduler's worker) ---------------------------------------

    def _pull(self, feed) -> None:
        """Pull `feed` on a thread of its own and wait for it PULL_DEADLINE_S at most; an overrun
        pull goes on alone, and the feed is not pulled again until it ends."""
        earlier = self.pulls.get(feed.name)
        if earlier is not None and earlier.is_alive():
            return
        self.pulls[feed.name] = thread = threading.Thread(target=self._pull_now, args=[feed], daemon=True,
                                                          name=f"mendd-pull-{feed.name}")
        thread.start()
        thread.join(PULL_DEADLINE_S)
        if thread.is_alive():
            self._feed_failed(feed.name, f"feed {feed.name}: the pull overran its deadline of {PULL_DEADLINE_S:.0f} s; "
                                         "it goes on alone, and the feed is not pulled again until it ends")

    def _pull_now(self, feed) -> None:
        try:
            report = pull(feed, self.ledger, self.home)
        except FeedError as error:  # unreachable, too large, unreadable: the next pull retries
            self._feed_failed(feed.name, str(error))
            return
        except Exception as error:  # noqa: BLE001 - a record that breaks parsing in a way nobody foresaw, a locked
            # ledger, an id the database refuses: the feed is stuck until someone looks, so it must show
            reason = f"feed {feed.name}: {describe_failure(error)}"[:MAX_REASON]
            if self.health.problems().get(f"feed:{feed.name}") != reason:  # once, not at every pull
                log.exception("%s", reason)
                quarantine_line(self.home, feed.name, "(pull)", reason)
            self._feed_failed(feed.name, reason)
            return
        self.health.clear(f"feed:{feed.name}")
        if report.received or report.quarantined:
            log.info("feed %s: %d received, %d duplicates, %d quarantined", feed.name, report.received,
                     report.duplicates, report.quarantined)

    def _feed_failed(self, name: str, reason: str) -> None:
        self.metrics.feed_errors.labels(name).inc()
        self.health.degrade(f"feed:{name}", reason)
        log.warning("%s", reason)

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
                    self._recover_if_unsettled()
                    systemd.notify(f"STATUS=cycle: {len(waiting)}+ corrections pending on {self.rt.served.tag}")
                    report = run_cycle(self.rt, should_stop=self._between_decisions)
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
            # A backlog keeps the one worker in this loop for hours: reviews and an operator's
            # checkout are acted on between cycles, not after it.
            self._tick()

    def _between_decisions(self) -> bool:
        """run_cycle's question before each decision, whether to stop: a sign of progress, too."""
        self.health.progress()
        self._write_health()
        return self.stopping.is_set()

    def _recover_if_unsettled(self) -> None:
        """A failed step may have left a commit half-way: undo or finish it first (home lock held)."""
        if self.unsettled:
            recover(self.rt.records.versions)
            self.unsettled = False

    def _tick(self) -> None:
        """Settle tagged reviews, follow an operator's checkout, refresh health and metrics."""
        try:
            with home_lock(self.home):
                self._recover_if_unsettled()
                self._settle_reviews()
                changed = served_version(self.rt.records.versions, self.rt.served)
                if changed is not None:
                    log.info("the store now holds %s (was serving %s): reloading", changed.tag, self.rt.served.tag)
                    self.rt.load(changed)
            self._publish()
            self.metrics.observe_ledger(self.rt.records.versions.ledger.counts())
            self.health.clear("tick")
        except Exception as error:
            self.unsettled = True
            self.health.degrade("tick", describe_failure(error))
            log.warning("tick failed: %s", error)
        self.metrics.version.set(tag_number(self.rt.served.tag))
        self.metrics.healthy.set(1 if self.health.ok else 0)

    def _settle_reviews(self) -> None:
        """Act on review tags; never raises, so that no run that cannot be settled keeps the tick
        from following an operator's checkout. What failed shows as `review` until it succeeds."""
        try:
            settled = settle_tagged(self.rt.records, rejudge_on_head(self.rt))
        except Exception as error:  # noqa: BLE001 - the held runs could not be listed (MLflow down)
            settled = [Settled("held runs", "failed", note=describe_failure(error))]
        for run_id, action, _, note in settled:
            log.info("review of %s: %s%s", run_id, action, f" ({note})" if note else "")
        failed = [f"{s.run_id}: {s.note}" for s in settled if s.action == "failed"]
        if failed:
            self.unsettled = True  # an approval may have stopped half-way through its commit
            self.health.degrade("review", "; ".join(failed))
        else:
            self.health.clear("review")

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
            self.health.write(self.home.health_path, {"serving": self.rt.served.tag if self.rt else None})
        except OSError as error:
            log.warning("cannot write %s: %s", self.home.health_path, error)
