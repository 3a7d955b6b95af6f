"""Run a whole FusionRun on this machine: the same DAG and the same task commands as the operator's Jobs.

Each task is a subprocess `python -m jobs <args>` with the spec in env FUSIONRUN_SPEC and the run name in
FUSIONRUN_NAME (the Kubernetes Job contract). Complete tasks (jobs.complete) are skipped, checked when they
become ready, so a deterministic redo upstream keeps its dependants; independent tasks run in parallel up
to the core count, each with its share of threads; training runs alone with every core. The first failure
stops the run and names the failed task's log. Logs: <store>/<run>/logs/<task>.log for local stores, else
<local dir>/logs/. At the end the run report is written (jobs.report).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

from jobs.cache import enabled as cache_enabled
from jobs.complete import (
    ManifestError,
    Policy,
    adopt,
    content_key,
    invalidate,
    read_manifest,
    why_incomplete,
)
from jobs.derive import derive_status
from jobs.observe import artifacts_uri, read_json, training_from_store
from jobs.plan import STAGE_ORDER, Stage, Task, TaskState, build_dag, downstream, ready_tasks
from jobs.registry import Layout
from jobs.retry import EXIT_PREEMPTED, TERMINATION_LOG_ENV, backoff_seconds
from jobs.settings import Settings
from jobs.spec import FusionRunSpec, Retry
from jobs.status import FusionRunStatus, Memoization, TaskStatus, TrainingProgress
from jobs.store import LocalStore, Store, StoreError, open_store
from jobs.transitions import (
    MEMO_KEY_CHARS,
    completed,
    count_failure,
    exit_failure,
    memoized,
    rerun,
    started,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STATUS_EVERY_SECONDS = 5.0


def _now() -> datetime:
    return datetime.now(timezone.utc)


class RunFailed(RuntimeError):
    """A task failed for good; the message is the run's status message (jobs.derive), then its log."""

    def __init__(self, task_id: str, log: Path, rc: int, message: str, tail: str):
        self.task_id, self.log, self.rc = task_id, log, rc
        super().__init__(f"{task_id}: {message}; log: {log}\n{tail}")


@dataclass
class RunResult:
    ran: int = 0
    skipped: int = 0
    reused: int = 0  # adopted from the shared cache (jobs.cache): made by another run
    outcomes: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    report: Path | None = None


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def threads_for(task: Task, n_parallel: int, cpus: int) -> int:
    """Threads a task gets: all cores when it runs alone or trains, else an equal share."""
    if task.stage is Stage.train or n_parallel <= 1:
        return cpus
    return max(1, cpus // n_parallel)


@dataclass
class _Running:
    task: Task
    proc: subprocess.Popen
    log: Path
    started: float


@dataclass
class TaskBook:
    """The local runner's task records and the run's status from them (pure: the runner brings the time
    and what it read from the store). Each outcome of a task's process moves its record by
    jobs.transitions, as the operator moves it from the task's Jobs, and the status is jobs.derive's: the
    same history gives the same status document as `kubectl get fusionrun` shows."""

    dag: list[Task]
    retry: Retry
    artifacts_uri: str
    records: dict[str, TaskStatus] = field(default_factory=dict)
    status: FusionRunStatus = field(default_factory=FusionRunStatus)  # the last derived

    @cached_property
    def _stage_of(self) -> dict[str, str]:
        return {t.id: t.stage.value for t in self.dag}

    def record(self, tid: str) -> TaskStatus:
        return self.records.get(tid) or TaskStatus(id=tid, stage=self._stage_of[tid])

    def _put(self, rec: TaskStatus) -> TaskStatus:
        self.records[rec.id] = rec
        return rec

    def started(self, tid: str, *, now: datetime) -> TaskStatus:
        return self._put(started(self.record(tid), now=now))

    def completed(self, tid: str, *, now: datetime, memo: Memoization | None = None) -> TaskStatus:
        """Its outputs are complete: skipped, made by its attempt, or adopted from the shared cache (memo)."""
        rec = self.record(tid)
        return self._put(memoized(rec, memo, now=now) if memo else completed(rec, now=now))

    def exited(self, tid: str, *, exit_code: int, said: str | None, now: datetime) -> TaskStatus:
        """An attempt ended with a non-zero exit code: preempted (rerun at once, Pending), or a failure
        counted (Retrying, or Failed). said: the stage's last error line (its termination message)."""
        rec = self.record(tid)
        if exit_code == EXIT_PREEMPTED:
            return self._put(rerun(rec, reason="Preempted"))
        failure = exit_failure(attempt=rec.attempts, exit_code=exit_code, said=said)
        return self._put(count_failure(rec, failure, retry=self.retry, now=now))

    def stopped(self, *, reason: str) -> None:
        """The runner stopped its running tasks (a failure, SIGTERM): Pending, as stopped Jobs are."""
        for tid, rec in list(self.records.items()):
            if rec.state == "Running":
                self.records[tid] = rerun(rec, reason=reason)

    def derive(
        self,
        *,
        now: datetime,
        progress: Mapping[str, TrainingProgress] | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> FusionRunStatus:
        """The run's status now (progress: by variant, as the store has it; metrics: evaluate's)."""
        self.status = derive_status(
            old=self.status,
            dag=self.dag,
            records={t.id: self.record(t.id) for t in self.dag},
            now=now,
            artifacts_uri=self.artifacts_uri,
            progress=progress,
            metrics=metrics,
        )
        return self.status


@dataclass
class _Pass:
    """The state of one `LocalRunner.run`."""

    result: RunResult
    notify: Callable[[str, str, float], None]
    book: TaskBook  # what `fusionrun status` shows
    states: dict[str, TaskState] = field(default_factory=dict)
    running: dict[str, _Running] = field(default_factory=dict)
    queued: list[Task] = field(default_factory=list)
    not_before: dict[str, float] = field(default_factory=dict)  # task id -> earliest retry time
    saved_at: float = 0.0


class LocalRunner:
    def __init__(
        self,
        spec: FusionRunSpec,
        run_name: str,
        workers: int | None = None,
        local_dir: Path | None = None,
        python: str = sys.executable,
        store: Store | None = None,
        extra_env: dict[str, str] | None = None,
        settings: Settings | None = None,
    ):
        """settings: the process's (jobs.settings: the CLI's, from its environment, which the tasks'
        processes inherit); default: jobs.settings' defaults. A given store keeps its own."""
        self.spec, self.run_name, self.python = spec, run_name, python
        self.store = store or open_store(spec.store, run_name, settings or Settings(), check=spec.store.is_s3)
        self.cpus = cpu_count()
        self.workers = max(1, workers or self.cpus)
        if isinstance(self.store, LocalStore):
            self.local_dir = self.store.root
        else:
            self.local_dir = local_dir or Path.cwd() / "runs" / run_name
        self.log_dir = self.local_dir / Layout.LOGS
        self.extra_env = extra_env or {}
        self.dag = build_dag(spec)
        self.by_id = {t.id: t for t in self.dag}
        # The same completeness rule as the tasks themselves (jobs.complete), so that a task the runner
        # starts does not skip itself (a corrupt local shard, an edited corpus).
        self.policy = Policy.for_store(self.store)

    def env(self, threads: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        env["FUSIONRUN_SPEC"] = self.spec.model_dump_json(by_alias=True)
        env["FUSIONRUN_NAME"] = self.run_name
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "FUSIONRUN_THREADS"):
            env[var] = str(threads)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env

    def _launch(self, task: Task, threads: int) -> _Running:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{task.id}.log"
        said = self._termination_log(task.id)
        said.unlink(missing_ok=True)
        with open(log, "ab") as fh:
            fh.write(
                f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} python -m jobs {' '.join(task.args())} "
                f"(threads {threads})\n".encode()
            )
            proc = subprocess.Popen(
                [self.python, "-m", "jobs", *task.args()],
                env={**self.env(threads), TERMINATION_LOG_ENV: str(said)},
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=str(PROJECT_ROOT),
            )
        return _Running(task, proc, log, time.time())

    def _termination_log(self, tid: str) -> Path:
        """Where a task's process leaves its last error line (jobs.retry), as a pod's termination message."""
        return self.log_dir / f"{tid}.termination"

    def _said(self, tid: str) -> str | None:
        try:
            return self._termination_log(tid).read_text(errors="replace").strip() or None
        except OSError:
            return None

    def run(
        self,
        force_stage: str | None = None,
        on_task: Callable[[str, str, float], None] | None = None,
        until: str | None = None,
    ) -> RunResult:
        """Run every task not complete (force_stage: redo that stage and later ones; until: stop after
        that stage's tasks), retrying failed tasks as spec.retry says. Raises RunFailed when a task has
        failed for good (bad input, or spec.retry.maxAttempts failures)."""
        if until:
            last = STAGE_ORDER.index(Stage(until))
            self.dag = [t for t in self.dag if STAGE_ORDER.index(t.stage) <= last]
        if force_stage:
            for t in downstream(self.dag, Stage(force_stage)):
                invalidate(self.store, t)
        book = TaskBook(self.dag, self.spec.retry, artifacts_uri(self.store))
        pass_ = _Pass(result=RunResult(), notify=on_task or (lambda *_: None), book=book)
        stop = threading.Event()
        previous = _stop_on_sigterm(stop)
        try:
            while True:
                self._claim_ready(pass_)
                self._start_queued(pass_)
                if not pass_.running and not pass_.queued:
                    self._check_finished(pass_.states)
                    break
                time.sleep(0.1)
                self._reap(pass_)
                if stop.is_set():  # here, not in the handler: every started task is in pass_.running
                    raise RunStopped("stopped by SIGTERM; rerun to resume (complete tasks are skipped)")
        finally:
            self._stop_all(pass_.running)
            failed = any(r.state == "Failed" for r in book.records.values())
            book.stopped(reason="RunFailed" if failed else "Stopped")
            self._save_status(pass_, force=True)
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        from jobs.report import write_report

        result = pass_.result
        report_dir = self.local_dir / Layout.REPORT
        result.report = write_report(self.store, self.spec, self.run_name, report_dir, result)
        return result

    def _claim_ready(self, p: _Pass) -> None:
        """Skip ready tasks that are complete, queue the others; repeat, since a skipped task can make its
        dependants ready at once."""
        claimed = True
        while claimed:
            claimed = False
            for t in ready_tasks(self.dag, p.states):
                claimed = True
                t0 = time.time()
                if self._complete(t):
                    self._done(p, t.id, time.time() - t0, skipped=True)
                elif (memo := self._adopt(t)) is not None:
                    self._done(p, t.id, time.time() - t0, memo=memo)
                else:
                    p.queued.append(t)
                    p.states[t.id] = TaskState.running  # claimed: not offered again

    def _done(
        self, p: _Pass, tid: str, seconds: float, *, skipped: bool = False, memo: Memoization | None = None
    ) -> None:
        """A task whose outputs are complete: skipped, ran, or reused (memo: made by another run)."""
        p.states[tid] = TaskState.succeeded
        p.book.completed(tid, now=_now(), memo=memo)
        if memo is not None:
            p.result.reused += 1
            p.result.outcomes[tid] = "reused"
            self._outcome(p, tid, f"reused (from {memo.from_run}/{memo.from_task})", seconds)
        elif skipped:
            p.result.skipped += 1
            p.result.outcomes[tid] = "skipped"
            self._outcome(p, tid, "skipped", seconds)
        else:
            p.result.ran += 1
            p.result.outcomes[tid] = "ran"
            self._outcome(p, tid, "ran", seconds)

    def _reap(self, p: _Pass) -> None:
        """Collect finished tasks: success, a retry after its backoff (jobs.retry), or the run's failure."""
        for tid, r in list(p.running.items()):
            rc = r.proc.poll()
            if rc is None:
                continue
            del p.running[tid]
            secs = time.time() - r.started
            p.result.seconds[tid] = secs
            if rc == 0:  # it may have waited for another run writing the same entry, then adopted it
                self._done(p, tid, secs, memo=self._made_by_another(r.task))
                continue
            rec = p.book.exited(tid, exit_code=rc, said=self._said(tid), now=_now())
            if rec.state == "Failed":
                p.states[tid] = TaskState.failed
                self._outcome(p, tid, "FAILED", secs)
                raise RunFailed(tid, r.log, rc, rec.message or "", _tail(r.log))
            if rec.state == "Retrying":
                delay = backoff_seconds(self.spec.retry, rec.failures)
                limit = self.spec.retry.max_attempts
                self._outcome(p, tid, f"retry {rec.failures + 1} of {limit} in {delay}s", secs)
            else:  # preempted (a checkpoint was saved): again at once, no failure counted
                delay = 0
                self._outcome(p, tid, "preempted: again at once", secs)
            p.not_before[tid] = time.time() + delay
            p.queued.append(r.task)

    def _outcome(self, p: _Pass, tid: str, outcome: str, seconds: float) -> None:
        self._save_status(p)
        p.notify(tid, outcome, seconds)

    def _save_status(self, p: _Pass, force: bool = False) -> None:
        """Write the run's status (jobs.derive, from the task records) to the store, at most every few
        seconds: one object, rewritten."""
        if not force and time.time() - p.saved_at < STATUS_EVERY_SECONDS:
            return
        p.saved_at = time.time()
        with contextlib.suppress(StoreError):  # informational; the run itself goes on
            done = {tid for tid, r in p.book.records.items() if r.state == "Succeeded"}
            evaluated = any(t.stage is Stage.evaluate and t.id in done for t in self.dag)
            status = p.book.derive(
                now=_now(),
                progress=training_from_store(self.store, self.spec),
                metrics=read_json(self.store, Layout.METRICS) if evaluated else None,
            )
            self.store.put_bytes(Layout.STATUS, json.dumps(status.to_k8s(), sort_keys=True).encode())

    def _check_finished(self, states: dict[str, TaskState]) -> None:
        missing = [t.id for t in self.dag if states.get(t.id) is not TaskState.succeeded]
        if missing:
            raise RuntimeError(f"run stalled with tasks not done: {missing}")  # a DAG bug

    def _adopt(self, task: Task) -> Memoization | None:
        """Adopt the shared cache's entry for the task when one exists (jobs.cache): nothing is launched.
        Returns where the entry came from, or None on a miss."""
        if not cache_enabled(task, self.store.settings):
            return None
        try:
            key = content_key(self.store, self.spec, task, self.by_id)
            manifest = adopt(self.store, self.spec, task, self.by_id, self.run_name, key)
        except (ManifestError, StoreError):
            return None  # the task itself will say what is wrong
        if manifest is None:
            return None
        return self._made_by_another(task)

    def _made_by_another(self, task: Task) -> Memoization | None:
        """Where the shared entry a complete task's manifest points at came from, when another run made it."""
        manifest = (
            read_manifest(self.store, task) if cache_enabled(task, self.store.settings) else None
        ) or {}
        made = (manifest.get("summary") or {}).get("reused_from") or {}
        if not made.get("run"):
            return None
        key = str(manifest.get("cache_key") or "")[:MEMO_KEY_CHARS]
        return Memoization(key=key, from_run=made.get("run"), from_task=made.get("task"))

    def _complete(self, task: Task) -> bool:
        return why_incomplete(self.store, self.spec, task, self.by_id, self.policy) is None

    def _start_queued(self, p: _Pass) -> None:
        """Start queued tasks (in DAG order, retries once their backoff is over) while cores allow."""
        now = time.time()
        while p.queued:
            if any(r.task.stage is Stage.train for r in p.running.values()):
                return  # training has every core
            due = [t for t in p.queued if p.not_before.get(t.id, 0.0) <= now]
            if not due:
                return
            nxt = due[0]
            if nxt.stage is Stage.train and p.running:
                return  # wait for the cores to free up
            if len(p.running) >= self.workers:
                return
            n_parallel = min(self.workers, len(p.running) + len(due))
            p.queued.remove(nxt)
            p.running[nxt.id] = self._launch(nxt, threads_for(nxt, n_parallel, self.cpus))
            p.book.started(nxt.id, now=_now())
            self._save_status(p)

    def _stop_all(self, running: dict[str, _Running]) -> None:
        """On failure or interrupt: stop the other tasks (their outputs have no manifest: redone later)."""
        for r in running.values():
            if r.proc.poll() is None:
                r.proc.terminate()
        for r in running.values():
            try:
                r.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                r.proc.kill()
                r.proc.wait()


class RunStopped(RuntimeError):
    """The runner was asked to stop (SIGTERM); running tasks were stopped, complete ones stay complete."""


def _stop_on_sigterm(stop: threading.Event) -> Any:
    """On SIGTERM set `stop`: the run loop then stops at its next step, running tasks too (their outputs,
    having no manifest, are redone by the next run). Not an exception raised in the handler: one that
    lands between starting a task's process and recording it would leave that process running after the
    runner exits. Only possible in the main thread; returns the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    return signal.signal(signal.SIGTERM, handler)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# Fields only the operator acts on: a local run says it ignores them rather than silently doing so.
KUBERNETES_ONLY = (
    "resources",
    "image",
    "imagePullPolicy",
    "serviceAccountName",
    "suspend",
    "activeDeadlineSeconds",
    "ttlSecondsAfterFinished",
    "queueName",
    "priorityClassName",
    "workloadPriorityClassName",
    "deleteArtifacts",
    "store.credentialsSecret",
    "training.nodes",
)


def ignored_locally(spec: FusionRunSpec) -> list[str]:
    """The Kubernetes-only fields this spec sets (away from their defaults): a local run ignores them."""
    set_fields = spec.model_dump(by_alias=True, exclude_defaults=True)
    out = []
    for path in KUBERNETES_ONLY:
        node: Any = set_fields
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node not in (None, {}, []):
            out.append(path)
    return out
