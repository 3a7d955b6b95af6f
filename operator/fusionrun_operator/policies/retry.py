"""Retry policy: what a failed attempt was (permanent or not), and what follows it: a retry after
backoffSeconds * 2**(failures-1), or a failed task once maxAttempts attempts failed or at once when retrying
cannot help (exit code PERMANENT_EXIT_CODE = bad input, an image that cannot be pulled)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from fusionrun_operator.config import PERMANENT_EXIT_CODE, PERMANENT_WAITING_REASONS, PREEMPTED_EXIT_CODE
from fusionrun_operator.effects import Event, Transition
from fusionrun_operator.observations import JobObservation
from fusionrun_operator.times import iso
from jobs.retry import backoff_seconds as retry_backoff
from jobs.spec import FusionRunSpec
from jobs.status import TaskStatus


class Failure(NamedTuple):
    reason: str
    message: str
    permanent: bool


def backoff_seconds(spec: FusionRunSpec, failures: int) -> int:
    """Delay before the retry that follows the `failures`-th failure: backoffSeconds doubling (the local
    backend's too: jobs.retry.backoff_seconds)."""
    return retry_backoff(spec.retry, failures)


def failure_of(jobs: Sequence[JobObservation]) -> Failure | None:
    """What made an attempt fail, from its Jobs; None when none failed. A container that cannot start
    beats a permanent exit code, which beats any other failure. The stage's own last error line (its
    termination message) ends the message."""
    for j in jobs:
        if j.waiting_reason in PERMANENT_WAITING_REASONS:
            msg = f"job {j.name}: container cannot start: {j.waiting_reason}"
            return Failure(
                j.waiting_reason, msg + (f": {j.waiting_message}" if j.waiting_message else ""), True
            )
    for j in jobs:
        if j.state == "Failed" and j.exit_code == PERMANENT_EXIT_CODE:
            return Failure(
                "InvalidInput",
                f"job {j.name} exited with code {j.exit_code} (bad input: retrying cannot "
                f"help; see its log, fix the spec or the inputs){_said(j)}",
                True,
            )
    for j in jobs:
        if j.state == "Failed":
            reason = "DeadlineExceeded" if j.reason == "DeadlineExceeded" else "JobFailed"
            code = f" with exit code {j.exit_code}" if j.exit_code is not None else ""
            detail = f" ({j.reason}: {j.message})" if j.reason and j.message else ""
            return Failure(reason, f"job {j.name} failed{code}{detail}{_said(j)}", False)
    return None


def _said(j: JobObservation) -> str:
    return f": {j.termination_message}" if j.termination_message else ""


def interrupted(jobs: Sequence[JobObservation]) -> str | None:
    """Why a failed attempt is no failure of the task's own: a pod was preempted or evicted (condition
    DisruptionTarget), or the stage stopped on SIGTERM after saving a checkpoint (exit code 75). The task
    reruns at once, nothing counted."""
    if any(j.disrupted for j in jobs):
        return "Disrupted"
    if any(j.state == "Failed" and j.exit_code == PREEMPTED_EXIT_CODE for j in jobs):
        return "Preempted"
    return None


def count_failure(
    task_id: str,
    rec: TaskStatus,
    failure: Failure,
    current: Sequence[JobObservation],
    spec: FusionRunSpec,
    now: datetime,
) -> Transition:
    """Count the failure of attempt rec.attempts (once): Retrying with its due time, or Failed. The
    attempt's Jobs still active (other ranks, a stuck container) are deleted."""
    attempt, failures, limit = rec.attempts, rec.failures + 1, spec.retry.max_attempts
    events = [Event("Warning", "TaskFailed", f"{task_id} attempt {attempt}: {failure.message}")]
    update: dict[str, Any] = {"failures": failures, "last_failed_attempt": attempt, "reason": failure.reason}
    if failure.permanent or failures >= limit:
        why = "permanent error" if failure.permanent else f"{failures} of {limit} attempts failed"
        update |= {
            "state": "Failed",
            "message": f"{failure.message} ({why})",
            "next_attempt_time": None,
            "completion_time": iso(now),
        }
    else:
        delay = backoff_seconds(spec, failures)
        update |= {
            "state": "Retrying",
            "message": f"{failure.message}; retry {failures + 1} of {limit} in {delay}s",
            "next_attempt_time": iso(now + timedelta(seconds=delay)),
        }
        events.append(Event("Normal", "RetryScheduled", f"{task_id}: attempt {attempt + 1} in {delay}s"))
    return Transition(
        rec.model_copy(update=update),
        delete=tuple(j.name for j in current if j.state == "Active"),
        events=tuple(events),
    )
