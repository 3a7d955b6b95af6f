"""Status policy, per stage: status.stages.<stage> from the stage's task records."""

from __future__ import annotations

from collections.abc import Sequence

from fusionrun_operator.pipeline import STAGES
from jobs.status import Stages, StageStatus, TaskStatus
from jobs.status import stage_entry as render_stage


def stage_entry(
    stage: str, tasks: Sequence[TaskStatus], old: StageStatus, uri: str, now_s: str
) -> StageStatus:
    """The stage's entry, rendered as the local backend renders it (jobs.status.stage_entry)."""
    return render_stage(list(tasks), old, f"{uri}{stage}/", now_s)


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
