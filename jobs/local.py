"""Run a whole FusionRun on this machine: the same DAG and the same task commands as the operator's Jobs.

Each task is a subprocess `python -m jobs <args>` with the spec in env FUSIONRUN_SPEC and the run name in
FUSIONRUN_NAME (the Kubernetes Job contract). Complete tasks (jobs.manifest) are skipped, checked when they
become ready, so a deterministic redo upstream keeps its dependants; independent tasks run in parallel up
to the core count, each with its share of threads; training runs alone with every core. The first failure
stops the run and names the failed task's log. Logs: <store>/<run>/logs/<task>.log for local stores, else
<local dir>/logs/. At the end the run report is written (jobs.report).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.manifest import invalidate, why_incomplete
from jobs.plan import STAGE_ORDER, Stage, Task, TaskState, build_dag, downstream, ready_tasks
from jobs.spec import FusionRunSpec
from jobs.stages.common import verify_outputs
from jobs.store import LocalStore, Store, open_store

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class RunFailed(RuntimeError):
    """A task failed; the message names it and its log."""

    def __init__(self, task_id: str, log: Path, rc: int, tail: str):
        self.task_id, self.log, self.rc = task_id, log, rc
        super().__init__(f"task {task_id} failed (exit {rc}); log: {log}\n{tail}")


@dataclass
class RunResult:
    ran: int = 0
    skipped: int = 0
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
    ):
        self.spec, self.run_name, self.python = spec, run_name, python
        self.store = store or open_store(spec.store, run_name, check=spec.store.is_s3)
        self.cpus = cpu_count()
        self.workers = max(1, workers or self.cpus)
        if isinstance(self.store, LocalStore):
            self.local_dir = self.store.root
        else:
            self.local_dir = local_dir or Path.cwd() / "runs" / run_name
        self.log_dir = self.local_dir / "logs"
        self.extra_env = extra_env or {}
        self.dag = build_dag(spec)
        self.by_id = {t.id: t for t in self.dag}
        # Local files are cheap to hash: verify outputs' checksums, so a corrupted shard is redone (the
        # task itself verifies the same way, so it does not skip what the runner found corrupt).
        self.verify = verify_outputs(self.store)

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
        with open(log, "ab") as fh:
            fh.write(
                f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} python -m jobs {' '.join(task.args())} "
                f"(threads {threads})\n".encode()
            )
            proc = subprocess.Popen(
                [self.python, "-m", "jobs", *task.args()],
                env=self.env(threads),
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=str(PROJECT_ROOT),
            )
        return _Running(task, proc, log, time.time())

    def run(
        self,
        force_stage: str | None = None,
        on_task: Callable[[str, str, float], None] | None = None,
        until: str | None = None,
    ) -> RunResult:
        """Run every task not complete (force_stage: redo that stage and later ones; until: stop after
        that stage's tasks). Raises RunFailed on the first failed task."""
        if until:
            last = STAGE_ORDER.index(Stage(until))
            self.dag = [t for t in self.dag if STAGE_ORDER.index(t.stage) <= last]
        if force_stage:
            for t in downstream(self.dag, Stage(force_stage)):
                invalidate(self.store, t)
        result = RunResult()
        previous = _stop_on_sigterm()
        states: dict[str, TaskState] = {}
        running: dict[str, _Running] = {}
        queued: list[Task] = []
        notify = on_task or (lambda *_: None)
        try:
            while True:
                claimed = True
                while claimed:  # a skipped task can make its dependants ready at once
                    claimed = False
                    for t in ready_tasks(self.dag, states):
                        claimed = True
                        t0 = time.time()
                        if self._complete(t):
                            states[t.id] = TaskState.succeeded
                            result.skipped += 1
                            result.outcomes[t.id] = "skipped"
                            notify(t.id, "skipped", time.time() - t0)
                        else:
                            queued.append(t)
                            states[t.id] = TaskState.running  # claimed: not offered again
                self._start_queued(queued, running)
                if not running and not queued:
                    if any(s is not TaskState.succeeded for s in states.values()) or len(states) < len(
                        self.dag
                    ):
                        missing = [t.id for t in self.dag if states.get(t.id) is not TaskState.succeeded]
                        raise RuntimeError(f"run stalled with tasks not done: {missing}")  # a DAG bug
                    break
                time.sleep(0.1)
                for tid, r in list(running.items()):
                    rc = r.proc.poll()
                    if rc is None:
                        continue
                    del running[tid]
                    secs = time.time() - r.started
                    result.seconds[tid] = secs
                    if rc != 0:
                        states[tid] = TaskState.failed
                        notify(tid, "FAILED", secs)
                        raise RunFailed(tid, r.log, rc, _tail(r.log))
                    states[tid] = TaskState.succeeded
                    result.ran += 1
                    result.outcomes[tid] = "ran"
                    notify(tid, "ran", secs)
        finally:
            self._stop_all(running)
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        from jobs.report import write_report

        result.report = write_report(self.store, self.spec, self.run_name, self.local_dir / "report", result)
        return result

    def _complete(self, task: Task) -> bool:
        if why_incomplete(self.store, self.spec, task, self.by_id, verify=self.verify) is not None:
            return False
        from jobs.stages.prepare import texts_changed

        return texts_changed(self.store, self.spec, task) is None

    def _start_queued(self, queued: list[Task], running: dict[str, _Running]) -> None:
        while queued:
            if any(r.task.stage is Stage.train for r in running.values()):
                return  # training has every core
            nxt = queued[0]
            if nxt.stage is Stage.train and running:
                return  # wait for the cores to free up
            if len(running) >= self.workers:
                return
            n_parallel = min(self.workers, len(running) + len(queued))
            queued.pop(0)
            running[nxt.id] = self._launch(nxt, threads_for(nxt, n_parallel, self.cpus))

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


def _stop_on_sigterm() -> Any:
    """Turn SIGTERM into an exception so that running tasks are stopped too (their outputs, having no
    manifest, are redone by the next run). Only possible in the main thread; returns the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise RunStopped("stopped by SIGTERM; rerun to resume (complete tasks are skipped)")

    return signal.signal(signal.SIGTERM, handler)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
