"""Invalid spec policy: a spec that does not validate (cross-field rules the CRD schema cannot express)
fails the run at once (reason InvalidSpec, pydantic's message) and stops its running Jobs. The task records
are kept: a corrected spec picks up where the run was."""

from __future__ import annotations

from fusionrun_operator.effects import Effects, Event
from fusionrun_operator.observations import Observed
from fusionrun_operator.times import iso
from jobs.status import condition


def invalid_spec(obs: Observed, error: str) -> Effects:
    old, gen, now_s = obs.status, obs.run.generation, iso(obs.now)
    message = error.replace("\n  ", " ")
    conditions = [
        condition(old, type_, ok, reason, message if ok else "", gen, now_s)
        for type_, ok, reason in (
            ("Running", False, "InvalidSpec"),
            ("Succeeded", False, "InvalidSpec"),
            ("Failed", True, "InvalidSpec"),
            ("Suspended", False, "NotSuspended"),
        )
    ]
    keep = {c.type for c in conditions}
    conditions += [c for c in old.conditions if c.type not in keep]
    new = old.model_copy(
        update={
            "phase": "Failed",
            "message": message,
            "observed_generation": gen,
            "conditions": conditions,
            "completion_time": old.completion_time or now_s,
        }
    )
    events = []
    if old.phase != "Failed" or old.message != message:
        events.append(Event("Warning", "InvalidSpec", message))
    return Effects(status=new, delete_jobs=sorted(j.name for j in obs.jobs if j.running), events=events)
