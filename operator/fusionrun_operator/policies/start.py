"""Start policy: which tasks start now, and the Jobs (and Service) of their next attempt.

A task is due when it is Pending, or Retrying with its delay over, and all its dependencies succeeded;
the engine asks only when nothing stops the run (suspend, failure, deadline). Starting a task never makes
another ready in the same pass (it is Running, not Succeeded), so readiness is decided on the records as
the pass found them.

How due tasks become Jobs depends on the shape (config.server, capabilities.py):
- one Job per task (per node rank for multi-node training): at most resources.<stage>.parallelism tasks
  of one shard group (stage + model / variant) run at once;
- Indexed training: one Indexed Job per attempt (indexed_jobs.gang_manifests);
- Indexed shard groups: one Indexed Job for all the due shards of a group, with that parallelism; a group
  starts a new Job only when none of its tasks is running (one Job per group at a time) and none waits
  for its retry, so the failed and missing shards of one Job are retried together in the next (after the
  longest of their backoffs).
Before that, the memoization policy (policies.memoize) takes out the due tasks whose outputs the shared
cache already has (adopted, no Job: an Indexed group's Job leaves them out) or that another run is making
now (they wait).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from fusionrun_operator.config import OperatorConfig
from fusionrun_operator.effects import Event, Transition
from fusionrun_operator.indexed_jobs import gang_job_names, gang_manifests, group_manifest, shard_parallelism
from fusionrun_operator.k8s_objects import RunRef, task_job_names, task_manifests
from fusionrun_operator.observations import SharedOutput
from fusionrun_operator.policies.memoize import memoize
from fusionrun_operator.times import parse_time
from jobs.registry import format_indexes
from jobs.spec import FusionRunSpec
from jobs.status import TaskStatus
from jobs.transitions import started

if TYPE_CHECKING:
    from jobs.plan import Task


@dataclass(frozen=True)
class StartInputs:
    run: RunRef
    spec: FusionRunSpec
    config: OperatorConfig
    now: datetime
    shared: Mapping[str, SharedOutput] = field(default_factory=dict)  # the shared cache, by task id


def start_ready(
    dag: Iterable[Task], tasks: Mapping[str, TaskStatus], inp: StartInputs, seconds_left: float | None
) -> tuple[list[Transition], float | None]:
    """(transitions of the tasks that start now, are memoized or wait for another run, in DAG order;
    seconds until the next retry is due or a memoized task's dependants or a waiting task are looked at)."""
    due, wait = [], None
    running: dict[str, int] = {}  # running tasks per group
    backing_off: set[str] = set()  # groups with a retry not due yet
    for task in dag:
        rec = tasks[task.id]
        when = parse_time(rec.next_attempt_time)
        if rec.state == "Running":
            running[task.group] = running.get(task.group, 0) + 1
        elif rec.state == "Retrying" and when and when > inp.now:
            left = (when - inp.now).total_seconds()
            wait = left if wait is None else min(wait, left)
            backing_off.add(task.group)
        elif rec.state in ("Pending", "Retrying") and all(tasks[d].state == "Succeeded" for d in task.deps):
            due.append(task)
    shared = memoize(due, tasks, inp.shared, inp.now)
    started: list[Transition] = [*shared.adopted, *shared.waiting]
    for batch in batches(shared.rest, running, backing_off, inp):
        started += launch(batch, tasks, inp, seconds_left)
    again = [w for w in (wait, shared.requeue_after) if w is not None]
    return started, min(again) if again else None


def _indexed_group(task: Task, inp: StartInputs) -> bool:
    return task.definition.per_shard and inp.config.server.indexed_shards


def batches(
    due: Sequence[Task], running: Mapping[str, int], backing_off: set[str], inp: StartInputs
) -> list[list[Task]]:
    """The due tasks that start now, grouped by the Job they start in: a shard group's tasks one Job each
    within the group's free parallelism, or all together in one Indexed Job once none of the group runs
    and none waits for its retry (the group's failed and missing shards go in one Job)."""
    busy = dict(running)
    out: list[list[Task]] = []
    groups: dict[str, list[Task]] = {}
    for task in due:
        if _indexed_group(task, inp):
            if not busy.get(task.group) and task.group not in backing_off:
                if task.group not in groups:
                    out.append(groups.setdefault(task.group, []))
                groups[task.group].append(task)
            continue
        if task.definition.per_shard:
            if busy.get(task.group, 0) >= shard_parallelism(inp.spec, task.stage.value, inp.config):
                continue
            busy[task.group] = busy.get(task.group, 0) + 1
        out.append([task])
    return out


def launch(
    batch: Sequence[Task], tasks: Mapping[str, TaskStatus], inp: StartInputs, seconds_left: float | None
) -> list[Transition]:
    """The next attempt of every task of one batch: their records Running, the objects to create (with
    the batch's first task), the events."""
    first = batch[0]
    attempts = [tasks[t.id].attempts + 1 for t in batch]
    run, spec, cfg = inp.run, inp.spec, inp.config
    if _indexed_group(first, inp):
        job = group_manifest(run, spec, list(zip(batch, attempts, strict=True)), cfg, seconds_left)
        objects, names = [job], [job["metadata"]["name"]]
        shards = format_indexes(t.shard or 0 for t in batch)
        events = [f"{first.group}: shards {shards} (attempt {_span(attempts)}): {names[0]}"]
    elif first.distributed and cfg.server.indexed_training:
        objects = gang_manifests(run, spec, first, attempts[0], cfg, seconds_left)
        names = gang_job_names(run.name, spec, first, attempts[0])
        events = [f"{first.id}: attempt {attempts[0]}: {names[0]} ({spec.training.nodes} ranks, Indexed)"]
    else:
        objects = task_manifests(run, spec, first, attempts[0], cfg, active_deadline_seconds=seconds_left)
        names = task_job_names(run.name, spec, first, attempts[0])
        events = [f"{first.id}: attempt {attempts[0]}: {', '.join(names)}"]
    out = []
    for i, task in enumerate(batch):
        rec = started(tasks[task.id], now=inp.now).model_copy(update={"job_names": names})
        out.append(
            Transition(
                rec,
                create=tuple(objects) if i == 0 else (),
                events=tuple(Event("Normal", "TaskStarted", e) for e in events) if i == 0 else (),
            )
        )
    return out


def _span(attempts: Sequence[int]) -> str:
    lo, hi = min(attempts), max(attempts)
    return str(lo) if lo == hi else f"{lo}-{hi}"
