"""What one pass observed, parsed from Kubernetes objects: pure structs at the bottom of the operator."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from fusionrun_operator.config import NORMAL_WAITING_REASONS
from fusionrun_operator.k8s_objects import LABEL_ATTEMPT, LABEL_RANK, LABEL_TASK, RunRef
from jobs.status import FusionRunStatus

JobState = Literal["Active", "Succeeded", "Failed"]


@dataclass(frozen=True)
class Access:
    """One thing a pass checked before using it (the run's credentials, its store), as a condition says it:
    ok True / False / None (unknown: not checked), a CamelCase reason, a message that never holds a key."""

    ok: bool | None
    reason: str
    message: str


@dataclass(frozen=True)
class SecretRead:
    """A GET of the Secret a run names: the HTTP status (200, 404 not found, 403 not allowed by RBAC, ...),
    its labels and (base64) data. The data is never printed."""

    status: int
    labels: Mapping[str, str] = field(default_factory=dict)
    data: Mapping[str, str] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class JobObservation:
    name: str
    task_id: str
    attempt: int
    rank: int | None
    state: JobState
    generation: int | None = None
    deleting: bool = False
    reason: str | None = None  # the Job's Failed condition reason (BackoffLimitExceeded, DeadlineExceeded)
    message: str | None = None
    exit_code: int | None = None  # the stage container's, from its pod
    waiting_reason: str | None = None  # e.g. ErrImagePull, from its pod
    waiting_message: str | None = None

    @property
    def running(self) -> bool:
        """Active and not already being deleted: a Job that stopping would still affect."""
        return self.state == "Active" and not self.deleting


@dataclass(frozen=True)
class Observed:
    """Everything reconcile looks at."""

    run: RunRef
    spec: Mapping[str, Any]  # the raw .spec (validated by reconcile, so that a bad spec becomes a status)
    status: FusionRunStatus
    jobs: list[JobObservation]
    now: datetime
    completed: frozenset[str] | None = None  # None: the store was not read
    progress: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # variant -> progress.json
    metrics: Mapping[str, Any] | None = None
    alignment: Mapping[str, Any] | None = None  # per source: jobs.status.alignment_diagnostics
    credentials: Access | None = None  # the run's credentials Secret; None: not checked (no condition)
    store_access: Access | None = None  # whether the store was read this pass; None: no condition

    def jobs_by_task(self) -> dict[str, list[JobObservation]]:
        out: dict[str, list[JobObservation]] = {}
        for j in self.jobs:
            out.setdefault(j.task_id, []).append(j)
        return out


def _condition_true(obj: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return c
    return None


def _job_state(job: Mapping[str, Any]) -> JobState:
    status = job.get("status") or {}
    if _condition_true(job, "Complete") or (status.get("succeeded") or 0) >= 1:
        return "Succeeded"
    if _condition_true(job, "Failed") or (status.get("failed") or 0) >= 1:
        return "Failed"
    return "Active"


def _container_problems(pods: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """exit_code (non-zero), waiting_reason and waiting_message of a Job's pods' containers."""
    out: dict[str, Any] = {"exit_code": None, "waiting_reason": None, "waiting_message": None}
    for p in pods:
        for cs in (p.get("status") or {}).get("containerStatuses") or []:
            st = cs.get("state") or {}
            if "terminated" in st and st["terminated"].get("exitCode") not in (None, 0):
                out["exit_code"] = st["terminated"]["exitCode"]
            elif "waiting" in st and st["waiting"].get("reason") not in (None, *NORMAL_WAITING_REASONS):
                out["waiting_reason"] = st["waiting"]["reason"]
                out["waiting_message"] = st["waiting"].get("message")
    return out


def observe_jobs(
    jobs: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]] = ()
) -> list[JobObservation]:
    """Our Jobs (labelled by k8s_objects.labels_for) and their pods -> observations, sorted by name.
    Objects without our labels are ignored."""
    pods_by_job: dict[str, list[Mapping[str, Any]]] = {}
    for p in pods:
        labels = (p.get("metadata") or {}).get("labels") or {}
        owner = labels.get("batch.kubernetes.io/job-name") or labels.get("job-name")
        if owner:
            pods_by_job.setdefault(owner, []).append(p)
    out = []
    for j in jobs:
        meta = j.get("metadata") or {}
        labels = meta.get("labels") or {}
        if LABEL_TASK not in labels or LABEL_ATTEMPT not in labels:
            continue
        failed_cond = _condition_true(j, "Failed") or {}
        gen = (meta.get("annotations") or {}).get("fusionrun.dev/generation")
        out.append(
            JobObservation(
                name=meta.get("name", ""),
                task_id=labels[LABEL_TASK],
                attempt=int(labels[LABEL_ATTEMPT]),
                rank=int(labels[LABEL_RANK]) if LABEL_RANK in labels else None,
                state=_job_state(j),
                generation=int(gen) if gen and gen.isdigit() else None,
                deleting=bool(meta.get("deletionTimestamp")),
                reason=failed_cond.get("reason"),
                message=failed_cond.get("message"),
                **_container_problems(pods_by_job.get(meta.get("name", ""), [])),
            )
        )
    return sorted(out, key=lambda o: o.name)
