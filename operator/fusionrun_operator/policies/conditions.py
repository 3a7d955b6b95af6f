"""Status policy, conditions: run-level states (Running, Succeeded, Failed, Suspended), then one per stage
(Prepared, Extracted, ...). lastTransitionTime moves only when a condition's status changes."""

from __future__ import annotations

from jobs.status import Condition, FusionRunStatus, Stages, condition, conditions

__all__ = ["condition", "run_conditions"]


def run_conditions(
    old: FusionRunStatus,
    phase: str,
    fail_reason: str | None,
    message: str,
    stages: Stages,
    gen: int,
    now_s: str,
) -> list[Condition]:
    """Rendered as the local backend renders them (jobs.status.conditions)."""
    return conditions(old, phase, fail_reason, message, stages, gen, now_s)
