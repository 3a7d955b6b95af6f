"""Status policy, size: above COMPACT_TASKS_ABOVE tasks, tasks that are not retrying or failed keep only
what reconcile needs (attempt and failure counters, and the reasons later passes read: Memoized, counted
per stage, and WaitingForSharedOutput, said once in an event). The status must stay well below etcd's 1.5 MB
object limit (1024 shards x 4 models is ~8k tasks); Job names follow from the attempt, times are summarised
per stage."""

from __future__ import annotations

from collections.abc import Sequence

from jobs.status import MEMOIZED, WAITING, TaskStatus

COMPACT_TASKS_ABOVE = 256
KEPT_REASONS = frozenset({MEMOIZED, WAITING})


def compact(tasks: Sequence[TaskStatus]) -> list[TaskStatus]:
    if len(tasks) <= COMPACT_TASKS_ABOVE:
        return list(tasks)
    return [_slim(t) if t.state in ("Succeeded", "Running", "Pending") else t for t in tasks]


def _slim(t: TaskStatus) -> TaskStatus:
    update = {"job_names": [], "start_time": None, "completion_time": None, "memoized": None}
    update |= {"message": None} if t.reason in KEPT_REASONS else {"reason": None}
    return t.model_copy(update=update)
