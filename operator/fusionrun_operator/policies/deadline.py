"""Suspend / deadline policy: when the run's Jobs stop, and the activeDeadlineSeconds clock.

The clock runs like a Job's: from the run's first Job, restarted when the run resumes from suspension
(status.activeSince). Jobs stop on spec.suspend, on a failed run (fail fast, free the GPUs) and when the
deadline passes; a Job whose task's outputs are already complete is left to exit on its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from fusionrun_operator.observations import JobObservation
from fusionrun_operator.times import parse_time
from jobs.spec import FusionRunSpec
from jobs.status import FusionRunStatus, TaskStatus
from jobs.transitions import rerun


@dataclass(frozen=True)
class Clock:
    start: datetime | None  # the run's first Job (status.startTime)
    active_since: datetime | None  # start of the deadline clock (status.activeSince)

    def started(self, now: datetime) -> Clock:
        """The clock once a Job is created now."""
        return Clock(self.start or now, self.active_since or now)


def deadline_clock(old: FusionRunStatus, spec: FusionRunSpec, now: datetime) -> Clock:
    start = parse_time(old.start_time)
    since = parse_time(old.active_since) or start
    if old.phase == "Suspended" and not spec.suspend and since is not None:
        since = now  # resumed: suspended time does not count
    return Clock(start, since)


def deadline_passed(spec: FusionRunSpec, clock: Clock, now: datetime, any_failed: bool) -> bool:
    since, limit = clock.active_since, spec.active_deadline_seconds
    return bool(limit and since and not any_failed and (now - since).total_seconds() > limit)


def seconds_left(spec: FusionRunSpec, clock: Clock, now: datetime) -> float | None:
    """What is left of the run's deadline: each new Job gets it as its own activeDeadlineSeconds."""
    if not spec.active_deadline_seconds:
        return None
    since = clock.active_since
    return spec.active_deadline_seconds - ((now - since).total_seconds() if since else 0)


def stop_reason(spec: FusionRunSpec, any_failed: bool, deadline_hit: bool) -> str | None:
    if spec.suspend:
        return "Suspended"
    if any_failed:
        return "RunFailed"
    return "DeadlineExceeded" if deadline_hit else None


def stop_jobs(
    jobs: Iterable[JobObservation], tasks: dict[str, TaskStatus], reason: str
) -> tuple[dict[str, TaskStatus], list[str]]:
    """(records that change, Jobs to delete) to stop the run's Jobs: running tasks go back to Pending with
    the stop reason; Jobs of tasks already Succeeded are left alone."""
    # Jobs of tasks the spec no longer has are not looked at: the engine deletes those anyway.
    stopping = [j for j in jobs if j.running and j.task_id in tasks and tasks[j.task_id].state != "Succeeded"]
    changed: dict[str, TaskStatus] = {}
    for j in stopping:
        rec = changed.get(j.task_id, tasks[j.task_id])
        if rec.state == "Running":
            changed[j.task_id] = rerun(rec, reason=reason)
    return changed, [j.name for j in stopping]
