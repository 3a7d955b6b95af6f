"""How a failed task is retried: the exit-code contract of stage processes and the backoff, shared by the
local runner and the operator (pure, torch-free).

Exit codes of `python -m jobs ...`:
  0   done, or already complete
  1   failed; retrying may help (a store that was down, an out-of-memory kill, a corrupt input redone)
  2   bad input: an invalid spec, a bad store URI or endpoint, a model that cannot load, a missing corpus.
      Retrying cannot help: the run fails at once with the stage's message.
  75  preempted (SIGTERM): a checkpoint was saved; run again to continue (no failure counted)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jobs.spec import Retry

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PREEMPTED = 0, 1, 2, 75
PERMANENT_EXIT_CODES = frozenset({EXIT_USAGE})
# Where a failing stage leaves its last error line for whoever started it: the operator sets it to the
# container's terminationMessagePath (/dev/termination-log), so the pod's terminated state carries the
# message and the run's Failed condition quotes it; the local runner sets it to logs/<task>.termination and
# quotes it alike. Unset: nothing is written.
TERMINATION_LOG_ENV = "FUSIONRUN_TERMINATION_LOG"
TERMINATION_MESSAGE_MAX = 4096  # bytes Kubernetes keeps of a container's termination message


def backoff_seconds(retry: Retry, failures: int) -> int:
    """Delay before the retry that follows the `failures`-th failure: backoffSeconds, doubling."""
    return retry.backoff_seconds * 2 ** max(0, failures - 1)


def retry_after(retry: Retry, *, permanent: bool, failures: int) -> int | None:
    """Seconds before the next attempt of a task whose attempt just failed, with `failures` counted
    failures (this one included), or None when it has failed for good: retrying cannot help (`permanent`:
    bad input, exit code 2) or spec.retry.maxAttempts attempts failed. The one retry decision of both
    backends (jobs.transitions.count_failure)."""
    if permanent or failures >= retry.max_attempts:
        return None
    return backoff_seconds(retry, failures)


def write_termination_message(message: str, path: str | None) -> None:
    """Leave `message` (the stage's last error line) in the file at `path` (the entry point's
    FUSIONRUN_TERMINATION_LOG; none: nowhere), cut to what Kubernetes keeps. Best effort: a failure to
    write must not hide the stage's own error."""
    if not path:
        return
    data = message.encode(errors="replace")[:TERMINATION_MESSAGE_MAX]
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError:
        pass
