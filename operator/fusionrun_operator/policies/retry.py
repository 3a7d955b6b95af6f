"""Retry policy: what a failed attempt was (permanent or not), from its Jobs, and what follows it
(jobs.transitions.count_failure, the local backend's too: a retry after backoffSeconds * 2**(failures-1),
or a failed task once maxAttempts attempts failed or at once when retrying cannot help: exit code
PERMANENT_EXIT_CODE = bad input, an image that cannot be pulled)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from fusionrun_operator.capabilities import FAILED_JOBS_FINAL, Capabilities
from fusionrun_operator.config import PERMANENT_EXIT_CODE, PERMANENT_WAITING_REASONS, PREEMPTED_EXIT_CODE
from fusionrun_operator.effects import Event, Transition
from fusionrun_operator.observations import JobObservation
from jobs.retry import backoff_seconds
from jobs.spec import FusionRunSpec
from jobs.status import TaskStatus
from jobs.transitions import Failure, exit_failure
from jobs.transitions import count_failure as count_on_record


def failure_of(jobs: Sequence[JobObservation]) -> Failure | None:
    """What made an attempt fail, from its Jobs; None when none failed. A container that cannot start
    beats a permanent exit code, which beats any other failure. The stage's own last error line (its
    termination message) ends the message."""
    for j in jobs:
        if j.waiting_reason in PERMANENT_WAITING_REASONS:
            msg = f"attempt {j.attempt}: container cannot start: {j.waiting_reason}"
            return Failure(
                j.waiting_reason, msg + (f": {j.waiting_message}" if j.waiting_message else ""), True
            )
    failed = [j for j in jobs if j.state == "Failed"]
    first = next((j for j in failed if j.exit_code == PERMANENT_EXIT_CODE), failed[0] if failed else None)
    if first is None:
        return None
    detail = f" ({first.reason}: {first.message})" if first.reason and first.message else ""
    failure = exit_failure(
        attempt=first.attempt, exit_code=first.exit_code, said=first.termination_message, detail=detail
    )
    if not failure.permanent and first.reason == "DeadlineExceeded":
        return failure._replace(reason="DeadlineExceeded")
    return failure


def interrupted(jobs: Sequence[JobObservation]) -> str | None:
    """Why a failed attempt is no failure of the task's own: a pod was preempted or evicted (condition
    DisruptionTarget), or the stage stopped on SIGTERM after saving a checkpoint (exit code 75). The task
    reruns at once, nothing counted."""
    if any(j.disrupted for j in jobs):
        return "Disrupted"
    if any(j.state == "Failed" and j.exit_code == PREEMPTED_EXIT_CODE for j in jobs):
        return "Preempted"
    return None


def superseded(current: Sequence[JobObservation], server: Capabilities) -> tuple[str, ...]:
    """The Jobs of an attempt that is over, to delete before the next one starts: those still active
    (other ranks, a stuck container) and, where a Failed Job can come back to life (before 1.26, see
    Capabilities.failed_jobs_final), the failed ones too: else two attempts could run at once."""
    legacy = not server.failed_jobs_final
    return tuple(sorted(j.name for j in current if j.state == "Active" or (legacy and j.state == "Failed")))


def count_failure(
    task_id: str,
    rec: TaskStatus,
    failure: Failure,
    current: Sequence[JobObservation],
    *,
    spec: FusionRunSpec,
    server: Capabilities,
    now: datetime,
) -> Transition:
    """Count the failure of attempt rec.attempts (once): the record as jobs.transitions.count_failure
    says, its events, and the attempt's Jobs that could run beside a retry deleted."""
    new = count_on_record(rec, failure, retry=spec.retry, now=now)
    events = [Event("Warning", "TaskFailed", f"{task_id}: {failure.message}")]
    if new.state == "Retrying":
        delay = backoff_seconds(spec.retry, new.failures)
        events.append(Event("Normal", "RetryScheduled", f"{task_id}: attempt {rec.attempts + 1} in {delay}s"))
    # A failed task keeps its failed Jobs (their pods' logs): no next attempt could run beside them.
    stop = superseded(current, server if new.state == "Retrying" else Capabilities(version=FAILED_JOBS_FINAL))
    return Transition(new, delete=stop, events=tuple(events))
