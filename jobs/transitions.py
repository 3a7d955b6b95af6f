"""How one task's record (jobs.status.TaskStatus) moves, the same for both backends (pure, torch-free).

The operator learns what happened from Jobs and pods, the local runner from its subprocesses; both turn it
into the same calls here, so that a task with the same history has the same record:

| what happened | record |
|---|---|
| an attempt starts | `started`: Running, attempts + 1 |
| its outputs are complete in the store | `completed`: Succeeded, Completed (AlreadyInStore: none ran) |
| its outputs came from the shared cache | `memoized`: Succeeded, Memoized, where they came from |
| the store no longer vouches for them | `invalidated`: Pending, OutputsInvalidated |
| an attempt failed (`exit_failure`: from its exit code) | `count_failure`: Retrying (backoff) or Failed |
| an attempt stopped without a failure of its own (preempted, the run stopped) | `rerun`: Pending |

Failure messages name the attempt by its number, not by a Job or a process: the operator's Job names are in
the record's jobNames, the local runner's logs in `<store>/<run>/logs/`.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, NamedTuple

from jobs.retry import PERMANENT_EXIT_CODES, retry_after
from jobs.status import MEMOIZED, Memoization, TaskStatus

if TYPE_CHECKING:
    from jobs.spec import Retry

COMPLETED, ALREADY_IN_STORE, INVALIDATED = "Completed", "AlreadyInStore", "OutputsInvalidated"
INVALID_INPUT, JOB_FAILED = "InvalidInput", "JobFailed"
MEMO_KEY_CHARS = 16  # of a shared cache entry's content key, in status and events (`fusionrun cache ls`)


def iso(t: datetime) -> str:
    """A time as status stores it: RFC 3339, UTC, whole seconds."""
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Failure(NamedTuple):
    """What made an attempt fail: a CamelCase reason, a message for people, and whether retrying can help."""

    reason: str
    message: str
    permanent: bool


def exit_failure(
    *, attempt: int, exit_code: int | None, said: str | None = None, detail: str = ""
) -> Failure:
    """A failed attempt from its stage's exit code (jobs.retry's contract) and its last error line (`said`,
    the termination message). detail: what else is known of the failure, e.g. " (Reason: message)"."""
    tail = f": {said}" if said else ""
    if exit_code in PERMANENT_EXIT_CODES:
        return Failure(
            INVALID_INPUT,
            f"attempt {attempt} exited with code {exit_code} (bad input: retrying cannot help; see its "
            f"log, fix the spec or the inputs){tail}",
            True,
        )
    code = f" with exit code {exit_code}" if exit_code is not None else ""
    return Failure(JOB_FAILED, f"attempt {attempt} failed{code}{detail}{tail}", False)


def started(rec: TaskStatus, *, now: datetime) -> TaskStatus:
    """The task's next attempt has started."""
    update = {"state": "Running", "attempts": rec.attempts + 1, "next_attempt_time": None}
    update |= {"reason": None, "message": None, "start_time": rec.start_time or iso(now)}
    return rec.model_copy(update=update)


def succeeded(rec: TaskStatus, *, reason: str, now: datetime) -> TaskStatus:
    """Succeeded, once: an already Succeeded record stays as it is (its first completion time)."""
    if rec.state == "Succeeded":
        return rec
    update = {"state": "Succeeded", "reason": reason, "message": None, "next_attempt_time": None}
    return rec.model_copy(update=update | {"completion_time": iso(now)})


def completed(rec: TaskStatus, *, now: datetime) -> TaskStatus:
    """Its outputs are complete in the store: Completed when an attempt ran, else AlreadyInStore."""
    return succeeded(rec, reason=COMPLETED if rec.attempts else ALREADY_IN_STORE, now=now)


def memo_source(memo: Memoization) -> str:
    """Where a shared cache entry came from, for people."""
    made = f"{memo.from_run}/{memo.from_task}" if memo.from_run else "another run"
    return f"outputs of {made} (shared cache, key {memo.key[:MEMO_KEY_CHARS]})"


def memoized(rec: TaskStatus, memo: Memoization, *, now: datetime) -> TaskStatus:
    """Succeeded with outputs another task made (jobs.cache): reason Memoized, and where from."""
    update = {"state": "Succeeded", "reason": MEMOIZED, "message": memo_source(memo)}
    update |= {"next_attempt_time": None, "completion_time": iso(now), "memoized": memo}
    return rec.model_copy(update=update)


def invalidated(rec: TaskStatus) -> TaskStatus:
    """A success the store no longer vouches for (spec changed, outputs deleted): to be done again."""
    update = {"state": "Pending", "reason": INVALIDATED, "completion_time": None, "memoized": None}
    return rec.model_copy(update=update)


def rerun(rec: TaskStatus, *, reason: str) -> TaskStatus:
    """The attempt stopped without a failure of its own (preempted, its Job gone, the run stopped): Pending,
    a new attempt later, nothing counted."""
    return rec.model_copy(update={"state": "Pending", "reason": reason, "job_names": []})


def count_failure(rec: TaskStatus, failure: Failure, *, retry: Retry, now: datetime) -> TaskStatus:
    """Count the failure of attempt rec.attempts: Retrying with its due time (jobs.retry.retry_after), or
    Failed when retrying cannot help or spec.retry.maxAttempts attempts failed."""
    failures, limit = rec.failures + 1, retry.max_attempts
    update = {"failures": failures, "last_failed_attempt": rec.attempts, "reason": failure.reason}
    delay = retry_after(retry, permanent=failure.permanent, failures=failures)
    if delay is None:
        why = "permanent error" if failure.permanent else f"{failures} of {limit} attempts failed"
        update |= {"state": "Failed", "message": f"{failure.message} ({why})", "next_attempt_time": None}
        return rec.model_copy(update=update | {"completion_time": iso(now)})
    update |= {
        "state": "Retrying",
        "message": f"{failure.message}; retry {failures + 1} of {limit} in {delay}s",
        "next_attempt_time": iso(now + timedelta(seconds=delay)),
    }
    return rec.model_copy(update=update)
