"""Status policy, conditions: run-level states (Running, Succeeded, Failed, Suspended), then one per stage
(Prepared, Extracted, ...). lastTransitionTime moves only when a condition's status changes."""

from __future__ import annotations

from fusionrun_operator.pipeline import STAGES
from fusionrun_operator.policies.stages import stage_state
from jobs.status import STAGE_CONDITIONS, Condition, FusionRunStatus, Stages


def condition(
    old: FusionRunStatus, type_: str, ok: bool, reason: str, message: str, gen: int, now_s: str
) -> Condition:
    status = "True" if ok else "False"
    prev = old.condition(type_)
    changed = prev is None or prev.status != status
    return Condition(
        type=type_,
        status=status,
        reason=reason or None,
        message=message or None,
        observed_generation=gen,
        last_transition_time=now_s if changed else prev.last_transition_time,
    )


def run_conditions(
    old: FusionRunStatus,
    phase: str,
    fail_reason: str | None,
    message: str,
    stages: Stages,
    gen: int,
    now_s: str,
) -> list[Condition]:
    def c(type_: str, ok: bool, reason: str, msg: str) -> Condition:
        return condition(old, type_, ok, reason, msg, gen, now_s)

    def when(p: str) -> str:
        return message if phase == p else ""

    out = [
        c("Running", phase == "Running", "Running" if phase == "Running" else phase, message),
        c(
            "Succeeded",
            phase == "Succeeded",
            "AllTasksSucceeded" if phase == "Succeeded" else phase,
            when("Succeeded"),
        ),
        c("Failed", phase == "Failed", fail_reason or "AsExpected", when("Failed")),
        c(
            "Suspended",
            phase == "Suspended",
            "SuspendRequested" if phase == "Suspended" else "NotSuspended",
            when("Suspended"),
        ),
    ]
    for s in STAGES:
        st = stage_state(stages, s)
        if st.state == "Skipped":
            out.append(c(STAGE_CONDITIONS[s], False, "Disabled", f"{s} is disabled in the spec"))
            continue
        ok = st.state == "Succeeded"
        reason = "AllTasksSucceeded" if ok else st.state
        out.append(c(STAGE_CONDITIONS[s], ok, reason, f"{st.succeeded}/{st.tasks} tasks succeeded"))
    return out
