"""Start policy: which tasks start now, and the Jobs (and Service) of their next attempt.

A task starts (attempt + 1) when it is Pending, or Retrying with its delay over, and all its dependencies
succeeded; the engine asks only when nothing stops the run (suspend, failure, deadline). Starting a task
never makes another ready in the same pass (it is Running, not Succeeded), so readiness is decided on the
records as the pass found them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from fusionrun_operator.config import OperatorConfig
from fusionrun_operator.effects import Event, Transition
from fusionrun_operator.k8s_objects import RunRef, task_job_names, task_manifests
from fusionrun_operator.times import iso, parse_time
from jobs.spec import FusionRunSpec
from jobs.status import TaskStatus

if TYPE_CHECKING:
    from jobs.plan import Task


@dataclass(frozen=True)
class StartInputs:
    run: RunRef
    spec: FusionRunSpec
    config: OperatorConfig
    now: datetime


def start_ready(
    dag: Iterable[Task], tasks: Mapping[str, TaskStatus], inp: StartInputs, seconds_left: float | None
) -> tuple[list[Transition], float | None]:
    """(transitions of the tasks that start now, in DAG order; seconds until the next retry is due)."""
    started, wait = [], None
    for task in dag:
        rec = tasks[task.id]
        due = parse_time(rec.next_attempt_time)
        if rec.state == "Retrying" and due and due > inp.now:
            left = (due - inp.now).total_seconds()
            wait = left if wait is None else min(wait, left)
        elif rec.state in ("Pending", "Retrying") and all(tasks[d].state == "Succeeded" for d in task.deps):
            started.append(start_task(task, rec, inp, seconds_left))
    return started, wait


def start_task(task: Task, rec: TaskStatus, inp: StartInputs, seconds_left: float | None) -> Transition:
    """The task's next attempt: its objects to create, its record Running."""
    attempt = rec.attempts + 1
    run, spec, now_s = inp.run, inp.spec, iso(inp.now)
    objects = task_manifests(run, spec, task, attempt, inp.config, active_deadline_seconds=seconds_left)
    names = task_job_names(run.name, spec, task, attempt)
    update = {"state": "Running", "attempts": attempt, "job_names": names, "next_attempt_time": None}
    return Transition(
        rec.model_copy(
            update=update | {"reason": None, "message": None, "start_time": rec.start_time or now_s}
        ),
        create=tuple(objects),
        events=(Event("Normal", "TaskStarted", f"{task.id}: attempt {attempt}: {', '.join(names)}"),),
    )
