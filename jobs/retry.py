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


def backoff_seconds(retry: Retry, failures: int) -> int:
    """Delay before the retry that follows the `failures`-th failure: backoffSeconds, doubling."""
    return retry.backoff_seconds * 2 ** max(0, failures - 1)


def retry_delay(retry: Retry, exit_code: int, failures: int) -> float | None:
    """Seconds to wait before the next attempt of a task whose attempt just ended with `exit_code` after
    `failures` counted failures (this one included), or None when the task has failed for good.
    A preempted attempt is not a failure: it resumes at once."""
    if exit_code == EXIT_PREEMPTED:
        return 0.0
    if exit_code in PERMANENT_EXIT_CODES or failures >= retry.max_attempts:
        return None
    return float(backoff_seconds(retry, failures))
