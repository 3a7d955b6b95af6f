"""Status policy, transition events: a stage that just succeeded, and a new run phase (kubectl describe
shows what happened). Task-level events come with the task transitions."""

from __future__ import annotations

from typing import Literal

from fusionrun_operator.effects import Event
from fusionrun_operator.pipeline import STAGES
from jobs.derive import stage_state
from jobs.status import STAGE_CONDITIONS, FusionRunStatus


def transition_events(old: FusionRunStatus, new: FusionRunStatus) -> list[Event]:
    out = []
    for s in STAGES:
        if (
            stage_state(new.stages, s).state == "Succeeded"
            and stage_state(old.stages, s).state != "Succeeded"
        ):
            out.append(Event("Normal", STAGE_CONDITIONS[s], f"stage {s}: all tasks succeeded"))
    if new.phase != old.phase or (old.observed_generation is None and new.phase == "Pending"):
        kind: Literal["Normal", "Warning"] = "Warning" if new.phase == "Failed" else "Normal"
        resumed = old.phase == "Suspended"
        reason = {
            "Failed": "RunFailed",
            "Succeeded": "RunSucceeded",
            "Suspended": "Suspended",
            "Running": "Resumed" if resumed else "RunStarted",
            "Pending": "Resumed" if resumed else "RunAccepted",
        }[new.phase]
        out.append(Event(kind, reason, new.message or new.phase))
    return out
