"""Status rendering policy: the new status.* from the task records of this pass, by the derivation both
backends share (jobs.derive.derive_status: stages, summary, progress column, conditions, training), plus
what only a cluster has (the deadline clock, the Job shape, restartFrom applied), compaction and the events
of its transitions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fusionrun_operator.capabilities import Capabilities
from fusionrun_operator.effects import Event
from fusionrun_operator.k8s_objects import artifacts_uri
from fusionrun_operator.pipeline import Pipeline
from fusionrun_operator.policies.compaction import compact
from fusionrun_operator.policies.deadline import Clock
from fusionrun_operator.policies.events import transition_events
from fusionrun_operator.policies.progress import progress_entries
from fusionrun_operator.times import iso
from jobs.derive import RunFacts, derive_status
from jobs.status import FusionRunStatus, TaskStatus


@dataclass(frozen=True, kw_only=True)
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
    derived = derive_status(
        old=old,
        dag=pipeline.tasks,
        records=records,
        now=inp.now,
        artifacts_uri=artifacts_uri(pipeline.spec, inp.run_name),
        facts=facts,
        progress=progress_entries(pipeline.train_tasks, inp.progress),
        metrics=inp.metrics,
        alignment=inp.alignment,
        generation=inp.generation,
    )
    new = derived.model_copy(
        update={
            "start_time": iso(clock.start) if clock.start else None,
            "active_since": iso(clock.active_since) if clock.active_since else None,
            "observed_restart": inp.restart_key or old.observed_restart,
            "tasks": compact(derived.tasks),
            "job_shape": inp.server.shape,
        }
    )
    events = transition_events(old, new)
    if old.job_shape != new.job_shape:  # at the run's start, and when a restarted operator chose another
        events.insert(0, Event("Normal", "JobShape", inp.server.describe()))
    return new, events
