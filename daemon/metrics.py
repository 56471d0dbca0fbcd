"""Prometheus metrics of one service, in its own registry (no process-global state)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STAGES = ("edit", "gate", "tracking", "commit")
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.corrections = Gauge("mendd_corrections", "Corrections in the ledger by status", ["status"], registry=self.registry)
        self.cycles = Counter("mendd_cycles", "Maintenance cycles run, by outcome", ["outcome"], registry=self.registry)
        self.decisions = Counter("mendd_decisions", "Gate decisions, by outcome", ["outcome"], registry=self.registry)
        self.seconds = Histogram("mendd_stage_seconds", "Seconds per decision stage", ["stage"], buckets=BUCKETS,
                                 registry=self.registry)
        self.version = Gauge("mendd_served_version", "Number of the served version (vNNNN)", registry=self.registry)
        self.healthy = Gauge("mendd_healthy", "1 when no component is degraded", registry=self.registry)
        self.cycle_failures = Counter("mendd_cycle_failures", "Cycles that failed (and left their corrections pending)",
                                      registry=self.registry)
        self.feed_errors = Counter("mendd_feed_errors", "Failed feed pulls", ["feed"], registry=self.registry)

    def observe_cycle(self, report) -> None:
        self.cycles.labels(report.outcome).inc()
        for step in report.steps:
            if step.decision is not None:
                self.decisions.labels(step.decision.outcome).inc()
            for stage, seconds in step.seconds.items():
                self.seconds.labels(stage).observe(seconds)

    def observe_ledger(self, counts: dict[str, int]) -> None:
        for status, n in counts.items():
            self.corrections.labels(status).set(n)
