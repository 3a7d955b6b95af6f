"""Status policy, the run's summary: phase, the reason it failed, message and current stage.

Failed (a task failed, or the deadline passed: sticky, time only moves on) beats Succeeded (all tasks),
which beats a credentials problem a person must fix (Failed too, until it is fixed), which beats Suspended;
otherwise Running once anything started, else Pending (with "waiting: ..." while the Secret is missing)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fusionrun_operator.observations import Access
from fusionrun_operator.policies.credentials import FATAL
from fusionrun_operator.policies.memoize import WAITING
from fusionrun_operator.policies.stages import current_stage, last_stage, stage_state
from jobs.status import Stages, TaskStatus


@dataclass(frozen=True)
class RunFacts:
    """The run-level facts the summary is decided from."""

    failed: Sequence[TaskStatus]  # failed task records, in DAG order
    deadline_hit: bool
    deadline_seconds: int | None
    all_done: bool
    suspended: bool
    blocked: Access | None = None  # a credentials problem: no Job starts (policies.credentials)


@dataclass(frozen=True)
class Summary:
    phase: str
    fail_reason: str | None
    message: str
    stage: str | None


def summarize(facts: RunFacts, tasks: Sequence[TaskStatus], stages: Stages) -> Summary:
    stage = current_stage(stages)
    if facts.failed:
        first = facts.failed[0]
        return Summary("Failed", first.reason or "TaskFailed", f"{first.id}: {first.message}", first.stage)
    if facts.deadline_hit:
        message = f"the run exceeded activeDeadlineSeconds ({facts.deadline_seconds}s)"
        return Summary("Failed", "DeadlineExceeded", message, stage)
    if facts.all_done:
        return Summary("Succeeded", None, f"all {len(tasks)} tasks succeeded", last_stage(stages))
    if facts.blocked is not None and facts.blocked.reason in FATAL:
        return Summary("Failed", facts.blocked.reason, facts.blocked.message, stage)
    if facts.suspended:
        return Summary("Suspended", None, "suspended (spec.suspend: true): no Jobs run", stage)
    started = any(r.attempts or r.state == "Succeeded" for r in tasks)
    st = stage_state(stages, stage) if stage else None
    message = f"{stage}: {st.succeeded}/{st.tasks} tasks done, {st.running} running" if st else "starting"
    retrying = [r for r in tasks if r.state == "Retrying"]
    if retrying:
        message += f"; {retrying[0].id} retrying at {retrying[0].next_attempt_time}"
    waiting = [r for r in tasks if r.state == "Pending" and r.reason == WAITING]
    if waiting:
        message += f"; {len(waiting)} waiting for other runs making the same outputs"
    if facts.blocked is not None:
        message = f"waiting: {facts.blocked.message}"
    return Summary("Running" if started else "Pending", None, message, stage)
