"""Status policy, per stage: status.stages.<stage> from the stage's task records."""

from __future__ import annotations

from collections.abc import Sequence

from fusionrun_operator.pipeline import STAGES
from jobs.status import Stages, StageStatus, TaskStatus

STAGE_JOB_NAMES_MAX = 50  # status.stages.<stage>.jobNames lists at most this many


def stage_entry(
    stage: str, tasks: Sequence[TaskStatus], old: StageStatus, uri: str, now_s: str
) -> StageStatus:
    if not tasks:
        return StageStatus(state="Skipped")
    states = [t.state for t in tasks]
    succeeded, running, failed = states.count("Succeeded"), states.count("Running"), states.count("Failed")
    if succeeded == len(tasks):
        state = "Succeeded"
    elif failed:
        state = "Failed"
    elif running:
        state = "Running"
    else:
        state = "Retrying" if "Retrying" in states else "Pending"
    starts = [t.start_time for t in tasks if t.start_time]
    running_jobs = sorted(name for t in tasks if t.state == "Running" for name in t.job_names)
    return StageStatus(
        state=state,
        tasks=len(tasks),
        succeeded=succeeded,
        running=running,
        failed=failed,
        attempts=sum(t.attempts for t in tasks),
        start_time=old.start_time or (min(starts) if starts else None),
        completion_time=(old.completion_time or now_s) if state == "Succeeded" else None,
        job_names=running_jobs[:STAGE_JOB_NAMES_MAX],
        output_uri=f"{uri}{stage}/",
    )


def stage_entries(tasks: Sequence[TaskStatus], old: Stages, uri: str, now_s: str) -> Stages:
    return Stages(
        **{s: stage_entry(s, [t for t in tasks if t.stage == s], getattr(old, s), uri, now_s) for s in STAGES}
    )


def stage_state(stages: Stages, stage: str) -> StageStatus:
    return getattr(stages, stage)


def current_stage(stages: Stages) -> str | None:
    """The first stage still to finish."""
    return next((s for s in STAGES if stage_state(stages, s).state not in ("Succeeded", "Skipped")), None)


def last_stage(stages: Stages) -> str | None:
    """The last stage the run has (evaluation may be disabled)."""
    return next((s for s in reversed(STAGES) if stage_state(stages, s).state != "Skipped"), None)
