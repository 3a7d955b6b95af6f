"""What one pass observed, parsed from Kubernetes objects: pure structs at the bottom of the operator."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from fusionrun_operator.config import NORMAL_WAITING_REASONS, PERMANENT_EXIT_CODE
from fusionrun_operator.indexed_jobs import decode_members
from fusionrun_operator.k8s_objects import (
    ANNOTATION_GENERATION,
    ANNOTATION_MEMBERS,
    INDEX_ANNOTATION,
    LABEL_ATTEMPT,
    LABEL_GROUP,
    LABEL_RANK,
    LABEL_STAGE,
    LABEL_TASK,
    RunRef,
)
from jobs.registry import parse_indexes
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
class SharedOutput:
    """What the shared cache (jobs.cache) says of one cacheable task, as store_view and the claims of
    runtime found it: for a complete task, the entry it was made from (when another task made it); for a
    ready task that has not started, its content key and either an entry to adopt (hit), or another task
    that is making the same output now (producer: wait for it), or nothing (run a Job)."""

    claim: str  # what one writer is chosen by: the cache area + the key by spec-level references
    key: str | None = None  # the content key; None: an identity is not recorded yet (no lookup)
    hit: bool = False  # a complete entry exists (or the task was made from one)
    from_run: str | None = None  # the run and task that made the entry
    from_task: str | None = None
    producer: str | None = None  # another run's task making it now (its claim or its lease)


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
    stage: str | None = None
    termination_message: str | None = None  # the failed container's (the stage's last error line)
    disrupted: bool = False  # a pod was preempted / evicted (condition DisruptionTarget)
    index: int | None = None  # the task's completion index in an Indexed shard group Job

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
    shared: Mapping[str, SharedOutput] = field(default_factory=dict)  # ready task -> its shared cache lookup
    made_from: Mapping[str, SharedOutput] = field(default_factory=dict)  # complete task -> the entry's maker

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
    """A Job of one task (or one gang): Succeeded once every completion succeeded, Failed once more pods
    failed than its backoffLimit allows (pods a podFailurePolicy ignores are not counted)."""
    status, spec = job.get("status") or {}, job.get("spec") or {}
    if _condition_true(job, "Complete") or (status.get("succeeded") or 0) >= (spec.get("completions") or 1):
        return "Succeeded"
    if _condition_true(job, "Failed") or (status.get("failed") or 0) > (spec.get("backoffLimit") or 0):
        return "Failed"
    return "Active"


def _container_problems(pods: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """exit_code (non-zero; the permanent one when a pod has it), its termination message, waiting_reason
    and waiting_message of a Job's (or one index's) pods' containers, and whether one was disrupted."""
    out: dict[str, Any] = {"exit_code": None, "waiting_reason": None, "waiting_message": None}
    out |= {"termination_message": None, "disrupted": False}
    for p in pods:
        out["disrupted"] = out["disrupted"] or _condition_true(p, "DisruptionTarget") is not None
        for cs in (p.get("status") or {}).get("containerStatuses") or []:
            st = cs.get("state") or {}
            term = st.get("terminated") or {}
            if term.get("exitCode") not in (None, 0) and out["exit_code"] != PERMANENT_EXIT_CODE:
                out["exit_code"] = term["exitCode"]
                out["termination_message"] = _last_line(term.get("message"))
            elif "waiting" in st and st["waiting"].get("reason") not in (None, *NORMAL_WAITING_REASONS):
                out["waiting_reason"] = st["waiting"]["reason"]
                out["waiting_message"] = st["waiting"].get("message")
    return out


def _last_line(message: str | None) -> str | None:
    """The last non-empty line of a termination message (FallbackToLogsOnError gives a log's tail)."""
    lines = [ln.strip() for ln in (message or "").splitlines() if ln.strip()]
    return lines[-1][:1000] if lines else None


def _pods_by_job(pods: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = {}
    for p in pods:
        labels = (p.get("metadata") or {}).get("labels") or {}
        owner = labels.get("batch.kubernetes.io/job-name") or labels.get("job-name")
        if owner:
            out.setdefault(owner, []).append(p)
    return out


def _common(job: Mapping[str, Any]) -> dict[str, Any]:
    """What every observation of one Job shares."""
    meta = job.get("metadata") or {}
    labels = meta.get("labels") or {}
    gen = (meta.get("annotations") or {}).get(ANNOTATION_GENERATION)
    return {
        "name": meta.get("name", ""),
        "stage": labels.get(LABEL_STAGE),
        "generation": int(gen) if gen and gen.isdigit() else None,
        "deleting": bool(meta.get("deletionTimestamp")),
    }


def _task_observation(job: Mapping[str, Any], pods: list[Mapping[str, Any]]) -> JobObservation:
    """A Job of one task: per task, per node rank, or the Indexed Job of a training attempt."""
    labels = job["metadata"]["labels"]
    failed_cond = _condition_true(job, "Failed") or {}
    return JobObservation(
        task_id=labels[LABEL_TASK],
        attempt=int(labels[LABEL_ATTEMPT]),
        rank=int(labels[LABEL_RANK]) if LABEL_RANK in labels else None,
        state=_job_state(job),
        reason=failed_cond.get("reason"),
        message=failed_cond.get("message"),
        **_common(job),
        **_container_problems(pods),
    )


def _index_state(job: Mapping[str, Any], index: int, done: set[int], failed: set[int]) -> JobState:
    if index in done:
        return "Succeeded"
    if index in failed or _condition_true(job, "Failed"):
        return "Failed"
    # Complete without completedIndexes: a server that ran it as a plain Job (no Indexed Jobs there)
    return "Succeeded" if _condition_true(job, "Complete") else "Active"


def _group_observations(job: Mapping[str, Any], pods: list[Mapping[str, Any]]) -> list[JobObservation]:
    """An Indexed shard group Job -> one observation per member task (its index's state and pods)."""
    status = job.get("status") or {}
    try:
        done = set(parse_indexes(status.get("completedIndexes")))
        failed = set(parse_indexes(status.get("failedIndexes")))
    except ValueError:
        done, failed = set(), set()
    by_index: dict[str, list[Mapping[str, Any]]] = {}
    for p in pods:
        meta = p.get("metadata") or {}
        idx = (meta.get("annotations") or {}).get(INDEX_ANNOTATION) or (meta.get("labels") or {}).get(
            INDEX_ANNOTATION
        )
        by_index.setdefault(str(idx), []).append(p)
    failed_cond = _condition_true(job, "Failed") or {}
    out = []
    for i, (task_id, attempt) in enumerate(
        decode_members(job["metadata"]["annotations"].get(ANNOTATION_MEMBERS))
    ):
        state = _index_state(job, i, done, failed)
        why = failed_cond if state == "Failed" else {}
        out.append(
            JobObservation(
                task_id=task_id,
                attempt=attempt,
                rank=None,
                state=state,
                reason=why.get("reason"),
                message=why.get("message"),
                index=i,
                **_common(job),
                **_container_problems(by_index.get(str(i), [])),
            )
        )
    return out


def observe_jobs(
    jobs: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]] = ()
) -> list[JobObservation]:
    """Our Jobs (labelled by k8s_objects.labels_for, or an Indexed shard group with its members) and their
    pods -> observations, one per task (and node rank), sorted by name. Objects without our labels are
    ignored."""
    pods_by_job = _pods_by_job(pods)
    out: list[JobObservation] = []
    for j in jobs:
        meta = j.get("metadata") or {}
        labels = meta.get("labels") or {}
        own_pods = pods_by_job.get(meta.get("name", ""), [])
        if LABEL_GROUP in labels and ANNOTATION_MEMBERS in (meta.get("annotations") or {}):
            out += _group_observations(j, own_pods)
        elif LABEL_TASK in labels and LABEL_ATTEMPT in labels:
            out.append(_task_observation(j, own_pods))
    return sorted(out, key=lambda o: (o.name, o.index or 0))
