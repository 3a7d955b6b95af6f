"""Status policy, size: above COMPACT_TASKS_ABOVE tasks, tasks that are not retrying or failed keep only
what reconcile needs (attempt and failure counters). The status must stay well below etcd's 1.5 MB object
limit (1024 shards x 4 models is ~8k tasks); Job names follow from the attempt, times are summarised per
stage."""

from __future__ import annotations

from collections.abc import Sequence

from jobs.status import TaskStatus

COMPACT_TASKS_ABOVE = 256


def compact(tasks: Sequence[TaskStatus]) -> list[TaskStatus]:
    if len(tasks) <= COMPACT_TASKS_ABOVE:
        return list(tasks)
    slim = {"job_names": [], "start_time": None, "completion_time": None, "reason": None}
    return [t.model_copy(update=slim) if t.state in ("Succeeded", "Running", "Pending") else t for t in tasks]
