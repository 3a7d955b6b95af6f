"""Status rendering policy: the new status.* from the task records of this pass, composed of the stage,
summary, condition, progress and compaction policies; plus the events of its transitions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fusionrun_operator.capabilities import Capabilities
from fusionrun_operator.effects import Event
from fusionrun_operator.k8s_objects import artifacts_uri
from fusionrun_operator.pipeline import Pipeline
from fusionrun_operator.policies.compaction import compact
from fusionrun_operator.policies.conditions import run_conditions
from fusionrun_operator.policies.deadline import Clock
from fusionrun_operator.policies.events import transition_events
from fusionrun_operator.policies.phase import RunFacts, summarize
from fusionrun_operator.policies.progress import progress_column, training_entries
from fusionrun_operator.policies.stages import stage_entries
from fusionrun_operator.times import iso
from jobs.status import FusionRunStatus, TaskStatus


@dataclass(frozen=True)
class StatusInputs:
    run_name: str
    generation: int
    now: datetime
    progress: Mapping[str, Mapping[str, Any]]  # variant -> progress.json
    metrics: Mapping[str, Any] | None  # evaluate/metrics.json; None: not read
    restart_key: str | None
    alignment: Mapping[str, Any] | None = None  # per source; None: not read this pass (keep the last)
    server: Capabilities = field(default_factory=Capabilities)  # the Job shape the operator uses


def render_status(
    old: FusionRunStatus,
    pipeline: Pipeline,
    records: Mapping[str, TaskStatus],
    facts: RunFacts,
    clock: Clock,
    inp: StatusInputs,
) -> tuple[FusionRunStatus, list[Event]]:
    now_s, gen = iso(inp.now), inp.generation
    tasks: Sequence[TaskStatus] = [records[t.id] for t in pipeline.tasks]
    uri = artifacts_uri(pipeline.spec, inp.run_name)
    stages = stage_entries(tasks, old.stages, uri, now_s)
    stages.align.diagnostics = dict(inp.alignment) if inp.alignment else old.stages.align.diagnostics
    summary = summarize(facts, tasks, stages)
    training = training_entries(old.training, pipeline.train_tasks, inp.progress)
    new = FusionRunStatus(
        phase=summary.phase,
        stage=summary.stage,
        progress=progress_column(summary.phase, tasks, pipeline.train_tasks, training, records),
        message=summary.message,
        observed_generation=gen,
        start_time=iso(clock.start) if clock.start else None,
        active_since=iso(clock.active_since) if clock.active_since else None,
        completion_time=(old.completion_time or now_s) if summary.phase in ("Succeeded", "Failed") else None,
        observed_restart=inp.restart_key or old.observed_restart,
        conditions=run_conditions(
            old, summary.phase, summary.fail_reason, summary.message, stages, gen, now_s
        ),
        stages=stages,
        tasks=compact(tasks),
        training=[training[v] for v in sorted(training)],
        metrics=dict(inp.metrics) if inp.metrics is not None else old.metrics,
        artifacts_uri=uri,
        job_shape=inp.server.shape,
    )
    events = transition_events(old, new)
    if old.job_shape != new.job_shape:  # at the run's start, and when a restarted operator chose another
        events.insert(0, Event("Normal", "JobShape", inp.server.describe()))
    return new, events
