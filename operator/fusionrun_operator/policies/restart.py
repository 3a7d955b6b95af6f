"""Restart policy: spec.retry.restartFrom + restartNonce, and a changed metadata.generation.

- A new (restartFrom, restartNonce) pair invalidates that stage's and later stages' outputs in the store
  and reruns them, keeping earlier stages; a pair already applied (status.observedRestart) does nothing.
- A changed metadata.generation gives failed tasks a fresh start (fix the spec, the run continues).
A fresh start forgets failures; the old attempt's Jobs are neither counted nor kept running.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fusionrun_operator.effects import Event, Transition
from fusionrun_operator.observations import JobObservation
from fusionrun_operator.pipeline import Pipeline
from jobs.status import FusionRunStatus, TaskStatus

if TYPE_CHECKING:
    from jobs.plan import Task


@dataclass(frozen=True)
class Restart:
    key: str | None  # "<restartFrom>/<restartNonce>" of the spec, None without restartFrom
    reset: frozenset[str] = frozenset()  # tasks to rerun from scratch (a new key)
    invalidate: tuple[str, ...] = ()  # their store manifests to drop, in DAG order
    events: tuple[Event, ...] = ()
    generation_changed: bool = False


def plan_restart(pipeline: Pipeline, old: FusionRunStatus, generation: int) -> Restart:
    retry = pipeline.spec.retry
    key = f"{retry.restart_from}/{retry.restart_nonce or ''}" if retry.restart_from else None
    changed = old.observed_generation is not None and old.observed_generation != generation
    if not key or key == old.observed_restart:
        return Restart(key, generation_changed=changed)
    reset = frozenset(t.id for t in pipeline.from_stage(retry.restart_from))
    message = f"rerunning from stage {retry.restart_from} ({len(reset)} tasks); earlier stages are kept"
    return Restart(
        key,
        reset,
        tuple(t.id for t in pipeline.tasks if t.id in reset),
        (Event("Normal", "RestartFrom", message),),
        changed,
    )


def fresh_start(task: Task, rec: TaskStatus, jobs: Sequence[JobObservation], restart: Restart) -> Transition:
    """The task's record as a fresh start when the restart applies to it, else unchanged."""
    if not (task.id in restart.reset or (restart.generation_changed and rec.state == "Failed")):
        return Transition(rec)
    attempt = max([rec.attempts, *(j.attempt for j in jobs)])
    new = TaskStatus(
        id=task.id,
        stage=task.stage.value,
        attempts=attempt,
        last_failed_attempt=attempt,
        reason="Restarted" if task.id in restart.reset else "SpecChanged",
    )
    return Transition(new, delete=tuple(j.name for j in jobs if j.running))


def completed_now(completed: frozenset[str] | None, restart: Restart) -> frozenset[str] | None:
    """What counts as complete in this pass: the reset tasks' manifests are being dropped."""
    return None if completed is None else frozenset(completed - restart.reset)
