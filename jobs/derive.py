"""A run's status from its task records: the one derivation both backends use (pure, torch-free).

(DAG, task records, time, what the store says of training and metrics) -> FusionRun.status: per-stage
entries, phase, message, current stage, the progress column, conditions, training progress. The operator
calls it at every pass (policies.status, then adds what only a cluster has: the deadline clock, Job names,
the Job shape); the local runner whenever a task moves (jobs.local.TaskBook) and `fusionrun status` from
the store (jobs.observe). So `fusionrun run` and `kubectl get fusionrun` say the same words for the same
state. The records themselves move by jobs.transitions.

The summary: Failed (a task failed, or the deadline passed: sticky) beats Succeeded (all tasks), which
beats a problem a person must fix (Failed too, until it is fixed), which beats Suspended; otherwise Running
once anything started, else Pending (with "waiting: ..." while something the run needs is missing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jobs.registry import STAGE_NAMES, STAGE_ORDER, Layout, Stage, Task
from jobs.status import (
    WAITING,
    FusionRunStatus,
    Stages,
    StageStatus,
    TaskStatus,
    TrainingProgress,
    conditions,
    stage_entry,
)
from jobs.transitions import iso


@dataclass(frozen=True)
class Blocked:
    """Something no task can start without (the operator's check of the run's credentials Secret)."""

    reason: str
    message: str
    fatal: bool  # a person must fix it: the run fails until then; else it waits


@dataclass(frozen=True)
class RunFacts:
    """What decides the summary besides the task records: a cluster's (the local backend has none)."""

    deadline_hit: bool = False
    deadline_seconds: int | None = None  # spec.activeDeadlineSeconds
    suspended: bool = False
    blocked: Blocked | None = None


@dataclass(frozen=True)
class Summary:
    phase: str
    fail_reason: str | None
    message: str
    stage: str | None


def stage_state(stages: Stages, stage: str) -> StageStatus:
    return getattr(stages, stage)


def stage_entries(tasks: Sequence[TaskStatus], old: Stages, uri: str, now_s: str) -> Stages:
    """status.stages: each stage's entry from its tasks' records (jobs.status.stage_entry)."""
    return Stages(
        **{
            s.value: stage_entry(
                [t for t in tasks if t.stage == s.value],
                stage_state(old, s.value),
                uri + Layout.stage_prefix(s),
                now_s,
            )
            for s in STAGE_ORDER
        }
    )


def current_stage(stages: Stages) -> str | None:
    """The first stage still to finish."""
    done = ("Succeeded", "Skipped")
    return next((s for s in STAGE_NAMES if stage_state(stages, s).state not in done), None)


def last_stage(stages: Stages) -> str | None:
    """The last stage the run has (evaluation may be disabled)."""
    return next((s for s in reversed(STAGE_NAMES) if stage_state(stages, s).state != "Skipped"), None)


def summarize(tasks: Sequence[TaskStatus], stages: Stages, facts: RunFacts) -> Summary:
    """Phase, the reason it failed, message and stage, from the records in DAG order (precedence above)."""
    stage = current_stage(stages)
    failed = [r for r in tasks if r.state == "Failed"]
    if failed:
        first = failed[0]
        message = f"{first.id}: {first.message or first.reason or 'failed'}"
        return Summary("Failed", first.reason or "TaskFailed", message, first.stage)
    if facts.deadline_hit:
        message = f"the run exceeded activeDeadlineSeconds ({facts.deadline_seconds}s)"
        return Summary("Failed", "DeadlineExceeded", message, stage)
    if all(r.state == "Succeeded" for r in tasks):
        return Summary("Succeeded", None, f"all {len(tasks)} tasks succeeded", last_stage(stages))
    if facts.blocked is not None and facts.blocked.fatal:
        return Summary("Failed", facts.blocked.reason, facts.blocked.message, stage)
    if facts.suspended:
        return Summary("Suspended", None, "suspended (spec.suspend: true): no Jobs run", stage)
    started = any(r.attempts or r.state == "Succeeded" for r in tasks)
    return Summary("Running" if started else "Pending", None, _progress_message(tasks, stages, facts), stage)


def _progress_message(tasks: Sequence[TaskStatus], stages: Stages, facts: RunFacts) -> str:
    """What a run on its way is doing: its stage's counts, a retry, tasks waiting for another run."""
    if facts.blocked is not None:
        return f"waiting: {facts.blocked.message}"
    stage = current_stage(stages)
    st = stage_state(stages, stage) if stage else None
    message = f"{stage}: {st.succeeded}/{st.tasks} tasks done, {st.running} running" if st else "starting"
    retrying = [r for r in tasks if r.state == "Retrying"]
    if retrying:
        message += f"; {retrying[0].id} retrying at {retrying[0].next_attempt_time}"
    waiting = [r for r in tasks if r.state == "Pending" and r.reason == WAITING]
    if waiting:
        message += f"; {len(waiting)} waiting for other runs making the same outputs"
    return message


def training_entries(
    old: Sequence[TrainingProgress], variants: Sequence[str], found: Mapping[str, TrainingProgress]
) -> dict[str, TrainingProgress]:
    """Progress by variant: what the store has now, else the last one seen (kept after training)."""
    out = {p.variant: p for p in old}
    out.update({v: found[v] for v in variants if v in found})
    return out


def progress_column(
    phase: str,
    dag: Sequence[Task],
    records: Mapping[str, TaskStatus],
    training: Mapping[str, TrainingProgress],
) -> str:
    """Tasks done / total; while training runs, the slowest running variant's percent."""
    running = [
        training[t.variant]
        for t in dag
        if t.stage is Stage.train and t.variant in training and records[t.id].state == "Running"
    ]
    if phase == "Running" and running:
        return f"train {min(p.percent for p in running):.0f}%"
    return f"{sum(records[t.id].state == 'Succeeded' for t in dag)}/{len(dag)}"


def derive_status(
    *,
    old: FusionRunStatus,
    dag: Sequence[Task],
    records: Mapping[str, TaskStatus],
    now: datetime,
    artifacts_uri: str,
    facts: RunFacts = RunFacts(),
    progress: Mapping[str, TrainingProgress] | None = None,
    metrics: Mapping[str, Any] | None = None,
    alignment: Mapping[str, Any] | None = None,
    generation: int | None = None,
) -> FusionRunStatus:
    """The run's status from every task's record (`records`, by task id) and the last status (`old`:
    condition transition times, first completion times, what was last seen of training, metrics and
    alignment, which None keeps). progress: variant -> training progress read now."""
    now_s = iso(now)
    tasks = [records[t.id] for t in dag]
    stages = stage_entries(tasks, old.stages, artifacts_uri, now_s)
    stages.align.diagnostics = dict(alignment) if alignment else old.stages.align.diagnostics
    summary = summarize(tasks, stages, facts)
    variants = [t.variant for t in dag if t.stage is Stage.train and t.variant]
    training = training_entries(old.training, variants, progress or {})
    finished = summary.phase in ("Succeeded", "Failed")
    return FusionRunStatus(
        phase=summary.phase,
        stage=summary.stage,
        progress=progress_column(summary.phase, dag, records, training),
        message=summary.message,
        observed_generation=generation,
        completion_time=(old.completion_time or now_s) if finished else None,
        conditions=conditions(
            old,
            phase=summary.phase,
            fail_reason=summary.fail_reason,
            message=summary.message,
            stages=stages,
            gen=generation,
            now_s=now_s,
        ),
        stages=stages,
        tasks=tasks,
        training=[training[v] for v in sorted(training)],
        metrics=dict(metrics) if metrics is not None else old.metrics,
        artifacts_uri=artifacts_uri,
    )
