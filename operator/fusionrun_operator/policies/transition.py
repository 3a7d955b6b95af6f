"""Task transition policy: one task's new record from its old record, its Jobs and the store (starting a
task is policies.start's business).

- Complete in the store -> Succeeded, never run again; reason Memoized (with its memoization) when its
  manifest points at a shared cache entry another task made (its Job adopted it, or a pass did: see
  policies.memoize). When the store could not be read (completed=None), a Job whose every rank succeeded
  counts, and an earlier Succeeded is remembered.
- The current attempt is max(record, highest attempt among its Jobs): a crash between creating a Job and
  writing status cannot make the next pass create another Job for the same attempt.
- A failed attempt (a Job failed, a container that cannot start, a Job that succeeded without writing its
  outputs) is counted once (lastFailedAttempt), by policies.retry; not while suspended (counting=False).
- A Job that vanished before its task completed is rerun as a new attempt without counting a failure; so is
  one that succeeded for an older spec generation, a multi-node group that lost a rank or had one
  disrupted (the whole gang restarts from its checkpoint), and an attempt that failed because a pod was
  preempted or evicted, or that stopped on SIGTERM after a checkpoint (exit code 75).
- The Jobs of an attempt are what observations.py made of them: one per task, per node rank, per Indexed
  training Job, or per index of an Indexed shard group (then deleting "its" Job stops the whole group).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from fusionrun_operator.capabilities import Capabilities
from fusionrun_operator.effects import Event, Transition
from fusionrun_operator.k8s_objects import ranks_of
from fusionrun_operator.observations import JobObservation, SharedOutput
from fusionrun_operator.policies.memoize import memoization, source
from fusionrun_operator.policies.retry import count_failure, failure_of, interrupted, superseded
from jobs.spec import FusionRunSpec
from jobs.status import TaskStatus
from jobs.transitions import COMPLETED, Failure, completed, invalidated, memoized, rerun, succeeded

if TYPE_CHECKING:
    from jobs.plan import Task


@dataclass(frozen=True)
class TaskInputs:
    """What the transition of one task looks at besides its record."""

    spec: FusionRunSpec
    generation: int  # the run's metadata.generation
    completed: frozenset[str] | None  # task ids complete in the store; None: the store was not read
    counting: bool  # count failures (not while suspended: stopping Jobs is no failure)
    now: datetime
    server: Capabilities = field(default_factory=Capabilities)  # the Job shape: Jobs per attempt
    made_from: Mapping[str, SharedOutput] = field(default_factory=dict)  # complete tasks made by another


def step_task(task: Task, rec: TaskStatus, jobs: Sequence[JobObservation], inp: TaskInputs) -> Transition:
    attempt = max([rec.attempts, *(j.attempt for j in jobs)])
    current = [j for j in jobs if j.attempt == attempt and not j.deleting]
    rec = rec.model_copy(
        update={"attempts": attempt} | ({"job_names": sorted(j.name for j in current)} if current else {})
    )
    done = len(current) >= ranks_of(inp.spec, task, inp.server) and all(
        j.state == "Succeeded" for j in current
    )
    if inp.completed is not None and task.id in inp.completed:
        found = inp.made_from.get(task.id)
        if found is not None and found.hit and rec.state != "Succeeded":
            event = Event("Normal", "TaskSucceeded", f"{task.id}: {source(found)}")
            return Transition(memoized(rec, memoization(found), now=inp.now), events=(event,))
        new = completed(rec, now=inp.now)
        return _succeeded(rec, new, f"{task.id}: outputs complete ({new.reason})")
    if inp.completed is None and (done or rec.state == "Succeeded"):
        return _succeeded(rec, succeeded(rec, reason=COMPLETED, now=inp.now), f"{task.id}: job(s) succeeded")
    if rec.state == "Succeeded":  # the store no longer vouches for it (spec changed, outputs deleted)
        rec = invalidated(rec)
    failure = failure_of(current)
    if failure is None and done:
        if any((j.generation or 0) < inp.generation for j in current):
            # Ran for an older spec whose outputs the current spec does not accept: a new attempt.
            return Transition(rerun(rec, reason="SpecChanged"))
        failure = Failure(
            "OutputMissing",
            f"job(s) {', '.join(j.name for j in current)} succeeded but the store has "
            f"no complete outputs for {task.id}; check spec.store and the job log",
            False,
        )
    if failure is not None and attempt > rec.last_failed_attempt and inp.counting:
        why = None if failure.permanent else interrupted(current)
        if why is not None:
            return _rerun(rec, why, current, inp.server)
        return count_failure(task.id, rec, failure, current, spec=inp.spec, server=inp.server, now=inp.now)
    return _no_new_failure(task, rec, current, inp)


def _rerun(
    rec: TaskStatus, reason: str, current: Sequence[JobObservation], server: Capabilities
) -> Transition:
    """A new attempt at once, no failure counted; what is left of this one (other ranks) is stopped."""
    return Transition(rerun(rec, reason=reason), delete=superseded(current, server))


def _succeeded(old: TaskStatus, new: TaskStatus, event: str) -> Transition:
    """Succeeded (once: an already Succeeded record stays as it is, without another event)."""
    if old.state == "Succeeded":
        return Transition(old)
    return Transition(new, events=(Event("Normal", "TaskSucceeded", event),))


def _no_new_failure(
    task: Task, rec: TaskStatus, current: Sequence[JobObservation], inp: TaskInputs
) -> Transition:
    # Active Jobs of an attempt newer than the last failure: running (also when the status still says
    # Retrying because the write after creating the retry's Job was lost).
    if current and rec.attempts > rec.last_failed_attempt and any(j.state == "Active" for j in current):
        if len(current) < ranks_of(inp.spec, task, inp.server):  # a rank vanished: the group restarts whole
            return _rerun(rec, "RankLost", current, inp.server)
        if task.distributed and any(j.disrupted for j in current):  # Kubernetes replaces one pod only
            return _rerun(rec, "RankDisrupted", current, inp.server)
        waiting = next((j for j in current if j.waiting_reason), None)  # e.g. its Secret does not exist yet
        note = (
            f"waiting: {waiting.waiting_reason}: {waiting.waiting_message or ''}".rstrip(": ")
            if waiting
            else None
        )
        return Transition(
            rec.model_copy(update={"state": "Running", "next_attempt_time": None, "message": note})
        )
    if rec.state == "Running" and not current:
        # Deleted before finishing (suspend, TTL, by hand): run it again as a new attempt, not a failure.
        return Transition(rerun(rec, reason="JobGone"))
    return Transition(rec)  # Failed and Retrying records wait (retry due time, a spec change)
