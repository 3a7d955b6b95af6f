"""Prometheus metrics of the operator, served on FUSIONRUN_METRICS_PORT (/metrics; "" disables).

| metric | type | labels | what |
|---|---|---|---|
| `fusionrun_runs` | gauge | phase | FusionRuns this operator reconciles, by status.phase |
| `fusionrun_jobs_created_total` | counter | stage | Jobs created (a 409, already there, is not counted) |
| `fusionrun_jobs_deleted_total` | counter | stage | Jobs deleted (stop, failure, suspend, lost rank, ...) |
| `fusionrun_task_retries_total` | counter | stage | failed attempts followed by a retry (backoff) |
| `fusionrun_task_failures_total` | counter | stage | tasks failed for good (permanent error or maxAttempts) |
| `fusionrun_tasks_memoized_total` | counter | stage | tasks made from the shared cache by a pass (no Job) |
| `fusionrun_reconcile_duration_seconds` | histogram | | one pass: read, reconcile, apply |
| `fusionrun_store_requests_total` | counter | operation | store requests: head, get, put, delete, list |
| `fusionrun_errors_total` | counter | kind | reconcile (a pass raised), store, create |
| `fusionrun_job_shape_info` | gauge | shape, server_version | 1 for the Job shape chosen at start |

Plus the process collectors (CPU, memory, open fds) of prometheus_client, in the operator's own registry
(each Operator has one: tests build several).
"""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.process_collector import ProcessCollector

from fusionrun_operator.capabilities import Capabilities
from jobs.status import FusionRunStatus

PHASES = ("Pending", "Running", "Succeeded", "Failed", "Suspended")
PASS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        self.runs = Gauge("fusionrun_runs", "FusionRuns by phase", ["phase"], registry=r)
        self.jobs_created = Counter("fusionrun_jobs_created", "Jobs created, by stage", ["stage"], registry=r)
        self.jobs_deleted = Counter("fusionrun_jobs_deleted", "Jobs deleted, by stage", ["stage"], registry=r)
        self.retries = Counter(
            "fusionrun_task_retries", "Task retries scheduled, by stage", ["stage"], registry=r
        )
        self.failures = Counter(
            "fusionrun_task_failures", "Tasks failed for good, by stage", ["stage"], registry=r
        )
        self.memoized_tasks = Counter(
            "fusionrun_tasks_memoized", "Tasks adopted from the shared cache, by stage", ["stage"], registry=r
        )
        self.pass_seconds = Histogram(
            "fusionrun_reconcile_duration_seconds", "One reconcile pass", buckets=PASS_BUCKETS, registry=r
        )
        self.store_requests = Counter(
            "fusionrun_store_requests", "Artifact store requests, by operation", ["operation"], registry=r
        )
        self.errors = Counter("fusionrun_errors", "Errors, by kind", ["kind"], registry=r)
        self.shape = Gauge(
            "fusionrun_job_shape_info", "The Job shape", ["shape", "server_version"], registry=r
        )
        for phase in PHASES:  # every series exists from the start (Grafana shows 0, not "no data")
            self.runs.labels(phase).set(0)
        for kind in ("reconcile", "store", "create"):
            self.errors.labels(kind)
        self._phases: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()  # passes of different runs run in different threads

    def serve(self, port: int) -> None:
        """/metrics on 0.0.0.0:port, in a daemon thread."""
        start_http_server(port, registry=self.registry)

    def set_shape(self, server: Capabilities) -> None:
        self.shape.clear()
        version = f"{server.version[0]}.{server.version[1]}" if server.version else "unknown"
        self.shape.labels(server.shape, version).set(1)

    def run_phase(self, run: tuple[str, str], phase: str | None) -> None:
        """A run's phase after a pass (None: the run is gone)."""
        with self._lock:
            if phase is None:
                self._phases.pop(run, None)
            else:
                self._phases[run] = phase
            counts = Tally(self._phases.values())
            for p in {*PHASES, *counts}:
                self.runs.labels(p).set(counts.get(p, 0))

    def store_request(self, operation: str) -> None:
        self.store_requests.labels(operation).inc()

    def jobs(self, created: Iterable[str], deleted: Iterable[str]) -> None:
        """Stages of the Jobs created and deleted by one pass."""
        for stage in created:
            self.jobs_created.labels(stage).inc()
        for stage in deleted:
            self.jobs_deleted.labels(stage).inc()

    def memoized(self, stages: Iterable[str]) -> None:
        """Stages of the tasks one pass adopted from the shared cache."""
        for stage in stages:
            self.memoized_tasks.labels(stage).inc()

    def tasks(self, old: FusionRunStatus, new: FusionRunStatus) -> None:
        retries, failures = task_outcomes(old, new)
        for stage, n in retries.items():
            self.retries.labels(stage).inc(n)
        for stage, n in failures.items():
            self.failures.labels(stage).inc(n)


def task_outcomes(old: FusionRunStatus, new: FusionRunStatus) -> tuple[Mapping[str, int], Mapping[str, int]]:
    """(retries, final failures) by stage that one pass decided: tasks whose failure count went up and
    that are now Retrying, or Failed. Pure."""
    before = {t.id: t.failures for t in old.tasks}
    retries: Tally[str] = Tally()
    failures: Tally[str] = Tally()
    for t in new.tasks:
        if t.failures > before.get(t.id, 0):
            if t.state == "Retrying":
                retries[t.stage] += 1
            elif t.state == "Failed":
                failures[t.stage] += 1
    return retries, failures
