"""FusionRun.status: the observed state, as the operator writes it through the status subresource.

One pydantic model serves two purposes: the operator builds and reads status with it, and `jobs.crd`
generates the CRD's status schema from it. Every field the operator writes must be declared here, or the
API server prunes it silently (structural schemas drop unknown fields).

Conditions follow the Kubernetes API conventions (type, status, reason in CamelCase, message,
observedGeneration, lastTransitionTime) and form a list-map keyed by `type`. `phase` is a summary for
printer columns; conditions are the API. Lists (conditions, tasks, training) are always written whole,
so that a JSON merge patch of the status replaces them instead of leaving stale entries behind.
This module imports no torch: the operator uses it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.alias_generators import to_camel

from jobs.registry import CONDITIONS, STAGE_NAMES, STAGES, Stage

Phase = Literal["Pending", "Running", "Succeeded", "Failed", "Suspended"]
TaskPhase = Literal["Pending", "Running", "Retrying", "Succeeded", "Failed"]
StagePhase = Literal["Pending", "Running", "Retrying", "Succeeded", "Failed", "Skipped"]
ConditionStatus = Literal["True", "False", "Unknown"]

# Condition types, one per stage, come from the registry (named as states, not transitions).
STAGE_CONDITIONS = CONDITIONS
MEMOIZED = "Memoized"  # a task's reason when its outputs came from the shared cache (jobs.cache)
WAITING = "WaitingForSharedOutput"  # a Pending task's reason while another run makes the same outputs


class StatusModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields ignored (an older operator's status)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class Condition(StatusModel):
    type: str = Field(..., description="Running, Succeeded, Failed, Suspended, or a stage's: Prepared, ...")
    status: ConditionStatus = Field(..., description="True, False or Unknown.")
    # The operator writes None (left out) rather than "": API servers 1.20 built with a newer Go without the
    # go-openapi patch of scripts/k8s-control-plane.sh read "" in a list item as null and reject it.
    reason: str | None = Field("", description="Why, in CamelCase: one word a program can match.")
    message: str | None = Field("", description="Why, for people.")
    observed_generation: int | None = Field(None, description="metadata.generation this was computed for.")
    last_transition_time: str | None = Field(None, description="When status last changed (RFC 3339).")


class Memoization(StatusModel):
    """How a task was made from the shared cache (jobs.cache) instead of running, like Argo's
    memoizationStatus."""

    hit: bool = Field(True, description="True: the task's outputs are an entry another task made.")
    key: str = Field(..., description="The content key's first 16 hex digits (`fusionrun cache ls`).")
    from_run: str | None = Field(None, description="The run whose task made the entry.")
    from_task: str | None = Field(None, description="That run's task.")


class TaskStatus(StatusModel):
    """One task of the DAG (jobs.plan.Task.id), the unit of retry."""

    id: str = Field(..., description="Task id, e.g. extract-target-00000.")
    stage: str
    state: TaskPhase = "Pending"
    attempts: int = Field(0, description="Attempts started; the current Job name ends with this number.")
    failures: int = Field(0, description="Failed attempts; the task fails when this reaches maxAttempts.")
    last_failed_attempt: int = Field(0, description="Attempt whose failure is already counted.")
    next_attempt_time: str | None = Field(None, description="When a retry starts (exponential backoff).")
    reason: str | None = None
    message: str | None = None
    job_names: list[str] = Field(default_factory=list, description="Jobs of the current attempt.")
    start_time: str | None = None
    completion_time: str | None = None
    memoized: Memoization | None = Field(
        None, description="Set when the task's outputs came from the shared cache (reason Memoized)."
    )


class StageStatus(StatusModel):
    state: StagePhase = "Pending"
    tasks: int = Field(0, description="Tasks of this stage.")
    succeeded: int = 0
    running: int = 0
    failed: int = 0
    attempts: int = Field(0, description="Attempts started, summed over the stage's tasks.")
    start_time: str | None = None
    completion_time: str | None = None
    job_names: list[str] = Field(default_factory=list, description="Jobs of the current attempts.")
    output_uri: str | None = Field(None, description="Where this stage's artifacts are.")
    shards: str | None = Field(None, description="Per-shard stages: shards done / total, e.g. 480/1500.")
    memoized: int | None = Field(
        None, description="Tasks whose outputs came from the shared cache (made by another run); unset: none."
    )
    diagnostics: dict[str, dict[str, Any]] | None = Field(
        None,
        description="align: per source, the share of target positions that received its distribution, the "
        "byte-boundary bound, the share of its probability mass that reached the target vocabulary, and "
        "the positions lost by cause (the align manifests hold the per-shard figures).",
    )


# One entry per stage of the registry (jobs.registry).
Stages = create_model(
    "Stages",
    __base__=StatusModel,
    __doc__="Per-stage progress.",
    **{s: (StageStatus, Field(default_factory=StageStatus)) for s in STAGE_NAMES},
)


class TrainingProgress(StatusModel):
    """From the store's train/<variant>/progress.json, written by the train job."""

    variant: str = Field(..., description="fused or clm.")
    step: int = 0
    total_steps: int = 0
    percent: float = 0.0
    loss: float | None = None
    clm_loss: float | None = None
    fusion_loss: float | None = None
    tokens_per_second: float | None = None
    learning_rate: float | None = None
    eta_seconds: float | None = None
    updated_at: str | None = None


class FusionRunStatus(StatusModel):
    phase: Phase = Field("Pending", description="Summary for printer columns; conditions are the API.")
    stage: str | None = Field(None, description="The stage in progress (or the one that failed).")
    progress: str | None = Field(None, description="Tasks done / total, or training percent.")
    message: str | None = None
    observed_generation: int | None = None
    start_time: str | None = None
    active_since: str | None = Field(
        None, description="Start of the activeDeadlineSeconds clock: the first Job, or the last resume."
    )
    completion_time: str | None = None
    observed_restart: str | None = Field(None, description="restartFrom/restartNonce already applied.")
    conditions: list[Condition] = Field(default_factory=list)
    stages: Stages = Field(default_factory=Stages)
    tasks: list[TaskStatus] = Field(default_factory=list)
    training: list[TrainingProgress] = Field(default_factory=list)
    metrics: dict[str, Any] | None = Field(None, description="evaluate/metrics.json of the finished run.")
    artifacts_uri: str | None = Field(None, description="Where the run's artifacts are: <store uri>/<run>/.")
    job_shape: str | None = Field(
        None,
        description="How the operator runs the tasks, chosen from the API server's capabilities: Indexed "
        "(one Indexed Job per training attempt and per shard group), IndexedTraining (per-shard tasks one "
        "Job each) or PerTask (one Job per task, one per node rank of training).",
    )

    def task(self, task_id: str) -> TaskStatus | None:
        for t in self.tasks:
            if t.id == task_id:
                return t
        return None

    def condition(self, type_: str) -> Condition | None:
        for c in self.conditions:
            if c.type == type_:
                return c
        return None

    def to_k8s(self) -> dict[str, Any]:
        """The status object to write: camelCase, unset optional fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def parse_status(raw: dict[str, Any] | None) -> FusionRunStatus:
    """The operator's status from a FusionRun's .status; anything unreadable counts as empty (a fresh run),
    since the operator rebuilds status from the cluster and the store anyway."""
    if not raw:
        return FusionRunStatus()
    try:
        return FusionRunStatus.model_validate(raw)
    except ValueError:
        return FusionRunStatus()


# --------------------------------------------------------------------------------------------------
# Rendering, shared by the operator and the local backend (pure)

STAGE_JOB_NAMES_MAX = 50


def stage_entry(tasks: list[TaskStatus], old: StageStatus, output_uri: str, now_s: str) -> StageStatus:
    """One stage's entry from its tasks' records (Skipped when the spec gives it no task)."""
    if not tasks:
        return StageStatus(state="Skipped")
    n = len(tasks)
    states = [t.state for t in tasks]
    succeeded, running, failed = states.count("Succeeded"), states.count("Running"), states.count("Failed")
    if succeeded == n:
        state = "Succeeded"
    elif failed:
        state = "Failed"
    elif running:
        state = "Running"
    elif "Retrying" in states:
        state = "Retrying"
    else:
        state = "Pending"
    starts = [t.start_time for t in tasks if t.start_time]
    # (the shards of one Indexed Job share its name)
    running_jobs = sorted({name for t in tasks if t.state == "Running" for name in t.job_names})
    return StageStatus(
        state=state,
        tasks=n,
        succeeded=succeeded,
        running=running,
        failed=failed,
        attempts=sum(t.attempts for t in tasks),
        start_time=old.start_time or (min(starts) if starts else None),
        completion_time=(old.completion_time or now_s) if state == "Succeeded" else None,
        job_names=running_jobs[:STAGE_JOB_NAMES_MAX],
        output_uri=output_uri,
        shards=f"{succeeded}/{n}" if STAGES[Stage(tasks[0].stage)].per_shard else None,
        memoized=sum(t.state == "Succeeded" and t.reason == MEMOIZED for t in tasks) or None,
    )


def condition(
    old: FusionRunStatus, type_: str, ok: bool, reason: str, message: str, gen: int | None, now_s: str
) -> Condition:
    """A condition whose lastTransitionTime moves only when its status flips."""
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


def conditions(
    old: FusionRunStatus,
    *,
    phase: str,
    fail_reason: str | None,
    message: str,
    stages: Any,
    gen: int | None,
    now_s: str,
) -> list[Condition]:
    """The run-level conditions (Running, Succeeded, Failed, Suspended), then one per stage."""

    def c(type_: str, ok: bool, reason: str, msg: str) -> Condition:
        return condition(old, type_, ok, reason, msg, gen, now_s)

    on = {p: phase == p for p in ("Running", "Succeeded", "Failed", "Suspended")}
    out = [
        c("Running", on["Running"], "Running" if on["Running"] else phase, message),
        c(
            "Succeeded",
            on["Succeeded"],
            "AllTasksSucceeded" if on["Succeeded"] else phase,
            message if on["Succeeded"] else "",
        ),
        c("Failed", on["Failed"], fail_reason or "AsExpected", message if on["Failed"] else ""),
        c(
            "Suspended",
            on["Suspended"],
            "SuspendRequested" if on["Suspended"] else "NotSuspended",
            message if on["Suspended"] else "",
        ),
    ]
    for name in STAGE_NAMES:
        st: StageStatus = getattr(stages, name)
        if st.state == "Skipped":
            out.append(c(STAGE_CONDITIONS[name], False, "Disabled", f"{name} is disabled in the spec"))
            continue
        done = st.state == "Succeeded"
        reason = "AllTasksSucceeded" if done else st.state
        out.append(c(STAGE_CONDITIONS[name], done, reason, f"{st.succeeded}/{st.tasks} tasks succeeded"))
    return out


_COUNTS = ("positions", "received", "boundary", "lost_at_boundary", "lost_special", "lost_no_boundary")
_COUNTS += ("lost_normalised", "normalised_documents")


def alignment_diagnostics(per_source: Mapping[str, list[Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per source, the align tasks' diagnostics (fusion.exact.AlignDiagnostics.to_dict, one per shard)
    summed over shards: counts, and the fractions that matter (received, the bound, mass reached)."""
    out: dict[str, dict[str, Any]] = {}
    for source, diags in per_source.items():
        if not diags:
            continue
        total = {k: int(sum(d.get(k, 0) for d in diags)) for k in _COUNTS}
        mass = sum(float(d.get("source_mass", 0.0)) for d in diags)
        reached = sum(float(d.get("projected_mass", 0.0)) for d in diags)
        n = total["positions"] or 1
        out[source] = {
            "method": diags[0].get("method"),
            **total,
            "received_fraction": round(total["received"] / n, 4),
            "boundary_fraction": round(total["boundary"] / n, 4),
            "mass_fraction": round(reached / mass, 4) if mass else 0.0,
        }
    return out
