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

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

Phase = Literal["Pending", "Running", "Succeeded", "Failed", "Suspended"]
TaskPhase = Literal["Pending", "Running", "Retrying", "Succeeded", "Failed"]
StagePhase = Literal["Pending", "Running", "Retrying", "Succeeded", "Failed", "Skipped"]
ConditionStatus = Literal["True", "False", "Unknown"]

# Condition types: run-level states, then one per stage (named as states, not transitions).
RUN_CONDITIONS: tuple[str, ...] = ("Running", "Succeeded", "Failed", "Suspended")
STAGE_CONDITIONS: dict[str, str] = {
    "prepare": "Prepared",
    "extract": "Extracted",
    "align": "Aligned",
    "fuse": "Fused",
    "train": "Trained",
    "evaluate": "Evaluated",
}


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


class Stages(StatusModel):
    prepare: StageStatus = Field(default_factory=StageStatus)
    extract: StageStatus = Field(default_factory=StageStatus)
    align: StageStatus = Field(default_factory=StageStatus)
    fuse: StageStatus = Field(default_factory=StageStatus)
    train: StageStatus = Field(default_factory=StageStatus)
    evaluate: StageStatus = Field(default_factory=StageStatus)


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
