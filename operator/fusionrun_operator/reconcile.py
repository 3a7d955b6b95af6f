"""Reconciliation, pure: (spec, status, owned Jobs and their pods, store state, now) -> actions + new status.

Level-based and idempotent: the same observations give the same answer, so operator restarts and
duplicate events never create anything twice (Job names are deterministic; 409 AlreadyExists is success).
The handlers (handlers.py) only gather the inputs and carry out the actions.

Rules, per task of the DAG (jobs.plan.build_dag):
- Complete in the store (jobs.manifest.completed_tasks) -> Succeeded; never run again. When the store
  cannot be read (`completed=None`), a Job whose every rank succeeded counts, and an earlier Succeeded
  is remembered.
- The current attempt is max(status attempts, highest attempt among its Jobs): a crash between creating
  a Job and writing status cannot make the next pass create another Job for the same attempt.
- A failed attempt (a Job failed, a container stuck on an image pull / config error, or a Job that
  succeeded without writing its outputs) is counted once (`lastFailedAttempt`). Permanent failures (exit
  code PERMANENT_EXIT_CODE = bad input, image pull and container config errors) fail the task at once;
  others retry after backoffSeconds * 2**(failures-1) until maxAttempts failures. Multi-node training is
  all-or-nothing: one failed rank deletes the group's other Jobs and the next attempt recreates all ranks.
- A Job that vanished (suspend, TTL, kubectl delete) before its task completed is rerun as a new attempt
  without counting a failure; so is one that succeeded for an older spec generation whose outputs the
  current spec no longer accepts.
- A task starts (attempt + 1) when it is Pending (or Retrying and its delay is over) and all its
  dependencies succeeded, unless the run is suspended, failed, or past its deadline.
Run level: an invalid spec fails the run (reason InvalidSpec, pydantic's message); spec.suspend deletes
active Jobs and creates nothing; any failed task fails the run and stops its other Jobs; a changed
metadata.generation gives failed tasks a fresh start; spec.retry.restartFrom + restartNonce (a new pair)
invalidates that stage's and later stages' outputs in the store and reruns them, keeping earlier stages.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from fusionrun_operator.config import (
    NORMAL_WAITING_REASONS,
    PERMANENT_EXIT_CODE,
    PERMANENT_WAITING_REASONS,
    OperatorConfig,
)
from fusionrun_operator.manifests import (
    LABEL_ATTEMPT,
    LABEL_RANK,
    LABEL_TASK,
    RunRef,
    artifacts_uri,
    effective_spec,
    task_job_names,
    task_manifests,
)
from jobs.plan import STAGE_ORDER, Stage, Task, build_dag, downstream
from jobs.spec import FusionRunSpec, SpecError, parse_spec
from jobs.status import (
    STAGE_CONDITIONS,
    Condition,
    FusionRunStatus,
    Stages,
    StageStatus,
    TaskStatus,
    TrainingProgress,
)

JobState = Literal["Active", "Succeeded", "Failed"]

# Above this many tasks, tasks that are not retrying or failed keep only what reconcile needs (attempt and
# failure counters): the status must stay well below etcd's 1.5 MB object limit (1024 shards x 4 models
# is ~8k tasks). Job names follow from the attempt; times are summarised per stage.
COMPACT_TASKS_ABOVE = 256
STAGE_JOB_NAMES_MAX = 50


# --------------------------------------------------------------------------------------------------
# Observations (parsed from Kubernetes objects: pure)


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


def _condition_true(obj: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return c
    return None


def observe_jobs(
    jobs: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]] = ()
) -> list[JobObservation]:
    """Our Jobs (labelled by manifests.labels_for) and their pods -> observations. Objects without our
    labels are ignored."""
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
        status = j.get("status") or {}
        failed_cond = _condition_true(j, "Failed")
        if _condition_true(j, "Complete") or (status.get("succeeded") or 0) >= 1:
            state: JobState = "Succeeded"
        elif failed_cond or (status.get("failed") or 0) >= 1:
            state = "Failed"
        else:
            state = "Active"
        exit_code = waiting_reason = waiting_message = None
        for p in pods_by_job.get(meta.get("name", ""), []):
            for cs in (p.get("status") or {}).get("containerStatuses") or []:
                st = cs.get("state") or {}
                if "terminated" in st and st["terminated"].get("exitCode") not in (None, 0):
                    exit_code = st["terminated"]["exitCode"]
                elif "waiting" in st and st["waiting"].get("reason") not in (None, *NORMAL_WAITING_REASONS):
                    waiting_reason = st["waiting"]["reason"]
                    waiting_message = st["waiting"].get("message")
        gen = (meta.get("annotations") or {}).get("fusionrun.dev/generation")
        out.append(
            JobObservation(
                name=meta.get("name", ""),
                task_id=labels[LABEL_TASK],
                attempt=int(labels[LABEL_ATTEMPT]),
                rank=int(labels[LABEL_RANK]) if LABEL_RANK in labels else None,
                state=state,
                generation=int(gen) if gen and gen.isdigit() else None,
                deleting=bool(meta.get("deletionTimestamp")),
                reason=(failed_cond or {}).get("reason"),
                message=(failed_cond or {}).get("message"),
                exit_code=exit_code,
                waiting_reason=waiting_reason,
                waiting_message=waiting_message,
            )
        )
    return sorted(out, key=lambda o: o.name)


@dataclass(frozen=True)
class Observed:
    """Everything reconcile looks at."""

    run: RunRef
    spec: Mapping[str, Any]  # the raw .spec (validated here, so that a bad spec becomes a status)
    status: FusionRunStatus
    jobs: list[JobObservation]
    now: datetime
    completed: frozenset[str] | None = None  # None: the store was not read
    progress: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # variant -> progress.json
    metrics: Mapping[str, Any] | None = None


# --------------------------------------------------------------------------------------------------
# Decisions


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass
class Plan:
    status: FusionRunStatus
    create: list[dict[str, Any]] = field(default_factory=list)  # Services first, then Jobs
    delete_jobs: list[str] = field(default_factory=list)
    invalidate: list[str] = field(default_factory=list)  # task ids whose store manifests to drop
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None  # seconds until something is due (a retry)


def iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(s: str | None) -> datetime | None:
    if not s:
        return None
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


def backoff_seconds(spec: FusionRunSpec, failures: int) -> int:
    """Delay before the retry that follows the `failures`-th failure: backoffSeconds doubling."""
    return spec.retry.backoff_seconds * 2 ** max(0, failures - 1)


def _failure_of(jobs: list[JobObservation]) -> tuple[str, str, bool] | None:
    """(reason, message, permanent) of a failed attempt from its Jobs, or None when none failed."""
    for j in jobs:
        if j.waiting_reason in PERMANENT_WAITING_REASONS:
            msg = f"job {j.name}: container cannot start: {j.waiting_reason}"
            return j.waiting_reason, msg + (f": {j.waiting_message}" if j.waiting_message else ""), True
    for j in jobs:
        if j.state == "Failed" and j.exit_code == PERMANENT_EXIT_CODE:
            return (
                "InvalidInput",
                f"job {j.name} exited with code {j.exit_code} (bad input: retrying cannot "
                "help; see its log, fix the spec or the inputs)",
                True,
            )
    for j in jobs:
        if j.state == "Failed":
            reason = "DeadlineExceeded" if j.reason == "DeadlineExceeded" else "JobFailed"
            code = f" with exit code {j.exit_code}" if j.exit_code is not None else ""
            detail = f" ({j.reason}: {j.message})" if j.reason and j.message else ""
            return reason, f"job {j.name} failed{code}{detail}", False
    return None


def _expected_ranks(spec: FusionRunSpec, task: Task) -> int:
    return spec.training.nodes if task.distributed and spec.training.nodes > 1 else 1


@dataclass
class _Ctx:
    obs: Observed
    spec: FusionRunSpec
    now_s: str
    events: list[Event]
    delete: list[str]
    jobs_by_task: dict[str, list[JobObservation]] = field(default_factory=dict)  # one pass over the Jobs


def _step_task(
    ctx: _Ctx, task: Task, rec: TaskStatus, completed: frozenset[str] | None, counting: bool
) -> TaskStatus:
    """One task's new record from its old record and its Jobs (no starting here)."""
    obs, spec = ctx.obs, ctx.spec
    jobs = ctx.jobs_by_task.get(task.id, [])
    attempt = max([rec.attempts, *(j.attempt for j in jobs)])
    current = [j for j in jobs if j.attempt == attempt and not j.deleting]
    rec = rec.model_copy(update={"attempts": attempt})
    if current:
        rec.job_names = sorted(j.name for j in current)
    group_done = len(current) == _expected_ranks(spec, task) and all(j.state == "Succeeded" for j in current)

    if completed is not None and task.id in completed:
        if rec.state != "Succeeded":
            how = "AlreadyInStore" if attempt == 0 else "Completed"
            ctx.events.append(Event("Normal", "TaskSucceeded", f"{task.id}: outputs complete ({how})"))
            rec = rec.model_copy(
                update={
                    "state": "Succeeded",
                    "reason": how,
                    "message": None,
                    "next_attempt_time": None,
                    "completion_time": ctx.now_s,
                }
            )
        return rec
    if completed is None and (group_done or rec.state == "Succeeded"):
        if rec.state != "Succeeded":
            ctx.events.append(Event("Normal", "TaskSucceeded", f"{task.id}: job(s) succeeded"))
            rec = rec.model_copy(
                update={
                    "state": "Succeeded",
                    "reason": "Completed",
                    "message": None,
                    "next_attempt_time": None,
                    "completion_time": ctx.now_s,
                }
            )
        return rec
    if rec.state == "Succeeded":  # the store no longer vouches for it (spec changed, outputs deleted)
        rec = rec.model_copy(
            update={"state": "Pending", "reason": "OutputsInvalidated", "completion_time": None}
        )

    failure = _failure_of(current)
    if failure is None and group_done:
        if any((j.generation or 0) < obs.run.generation for j in current):
            # Ran for an older spec whose outputs the current spec does not accept: a new attempt.
            return rec.model_copy(update={"state": "Pending", "reason": "SpecChanged", "job_names": []})
        failure = (
            "OutputMissing",
            f"job(s) {', '.join(j.name for j in current)} succeeded but the store has "
            f"no complete outputs for {task.id}; check spec.store and the job log",
            False,
        )
    if failure is not None and attempt > rec.last_failed_attempt and counting:
        reason, message, permanent = failure
        failures = rec.failures + 1
        ctx.delete += [j.name for j in current if j.state == "Active"]  # other ranks, a stuck container
        ctx.events.append(Event("Warning", "TaskFailed", f"{task.id} attempt {attempt}: {message}"))
        update: dict[str, Any] = {"failures": failures, "last_failed_attempt": attempt, "reason": reason}
        if permanent or failures >= spec.retry.max_attempts:
            why = (
                "permanent error" if permanent else f"{failures} of {spec.retry.max_attempts} attempts failed"
            )
            update |= {
                "state": "Failed",
                "message": f"{message} ({why})",
                "next_attempt_time": None,
                "completion_time": ctx.now_s,
            }
        else:
            delay = backoff_seconds(spec, failures)
            update |= {
                "state": "Retrying",
                "message": f"{message}; retry {failures + 1} of {spec.retry.max_attempts} in {delay}s",
                "next_attempt_time": iso(obs.now + timedelta(seconds=delay)),
            }
            ctx.events.append(
                Event("Normal", "RetryScheduled", f"{task.id}: attempt {attempt + 1} in {delay}s")
            )
        return rec.model_copy(update=update)
    # Active Jobs of an attempt newer than the last failure: running (also when the status still says
    # Retrying because the write after creating the retry's Job was lost).
    if current and attempt > rec.last_failed_attempt and any(j.state == "Active" for j in current):
        if len(current) < _expected_ranks(spec, task):  # a rank vanished: the group restarts whole
            ctx.delete += [j.name for j in current if j.state == "Active"]
            return rec.model_copy(update={"state": "Pending", "reason": "RankLost", "job_names": []})
        waiting = next((j for j in current if j.waiting_reason), None)  # e.g. its Secret does not exist yet
        note = (
            f"waiting: {waiting.waiting_reason}: {waiting.waiting_message or ''}".rstrip(": ")
            if waiting
            else None
        )
        return rec.model_copy(update={"state": "Running", "next_attempt_time": None, "message": note})
    if rec.state in ("Failed", "Retrying"):
        return rec
    if rec.state == "Running" and not current:
        # Deleted before finishing (suspend, TTL, by hand): run it again as a new attempt, not a failure.
        return rec.model_copy(update={"state": "Pending", "reason": "JobGone", "job_names": []})
    return rec


def _deps_ok(task: Task, tasks: Mapping[str, TaskStatus]) -> bool:
    return all(tasks[d].state == "Succeeded" for d in task.deps)


def _condition(
    old: FusionRunStatus, type_: str, status: str, reason: str, message: str, gen: int, now_s: str
) -> Condition:
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


def _progress(variant: str, raw: Mapping[str, Any]) -> TrainingProgress | None:
    """progress.json (step, total_steps, loss, clm_loss, fusion_loss, tokens_per_s, lr, eta_seconds,
    updated_at) -> status entry; None when it is not usable."""
    try:
        step, total = int(raw.get("step", 0)), int(raw.get("total_steps", 0))

        def num(key: str) -> float | None:
            v = raw.get(key)
            return float(v) if isinstance(v, int | float) and math.isfinite(v) else None

        updated = raw.get("updated_at")
        return TrainingProgress(
            variant=variant,
            step=step,
            total_steps=total,
            percent=round(100.0 * step / total, 1) if total > 0 else 0.0,
            loss=num("loss"),
            clm_loss=num("clm_loss"),
            fusion_loss=num("fusion_loss"),
            tokens_per_second=num("tokens_per_s"),
            learning_rate=num("lr"),
            eta_seconds=num("eta_seconds"),
            updated_at=str(updated) if updated is not None else None,
        )
    except (TypeError, ValueError):
        return None


def _stage_entry(
    stage: Stage, tasks: list[TaskStatus], old: StageStatus, uri: str, now_s: str
) -> StageStatus:
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
    return StageStatus(
        state=state,
        tasks=n,
        succeeded=succeeded,
        running=running,
        failed=failed,
        attempts=sum(t.attempts for t in tasks),
        start_time=old.start_time or (min(starts) if starts else None),
        completion_time=(old.completion_time or now_s) if state == "Succeeded" else None,
        job_names=sorted(name for t in tasks if t.state == "Running" for name in t.job_names)[
            :STAGE_JOB_NAMES_MAX
        ],
        output_uri=f"{uri}{stage.value}/",
    )


def reconcile(obs: Observed, config: OperatorConfig) -> Plan:
    old, now_s, gen = obs.status, iso(obs.now), obs.run.generation
    events: list[Event] = []
    try:
        spec = effective_spec(parse_spec(dict(obs.spec)), config)
    except SpecError as err:
        return _invalid_spec(obs, str(err))
    dag = build_dag(spec)
    plan = Plan(status=old)

    # restartFrom: a new (stage, nonce) pair invalidates that stage and later ones, keeps earlier ones.
    restart_key = (
        f"{spec.retry.restart_from}/{spec.retry.restart_nonce or ''}" if spec.retry.restart_from else None
    )
    reset: set[str] = set()
    if restart_key and restart_key != old.observed_restart:
        reset = {t.id for t in downstream(dag, Stage(spec.retry.restart_from))}
        plan.invalidate = [t.id for t in dag if t.id in reset]
        events.append(
            Event(
                "Normal",
                "RestartFrom",
                f"rerunning from stage {spec.retry.restart_from} "
                f"({len(reset)} tasks); earlier stages are kept",
            )
        )
    completed = None if obs.completed is None else frozenset(obs.completed - reset)
    generation_changed = old.observed_generation is not None and old.observed_generation != gen

    ctx = _Ctx(obs, spec, now_s, events, [])
    for j in obs.jobs:
        ctx.jobs_by_task.setdefault(j.task_id, []).append(j)
    old_tasks = {t.id: t for t in old.tasks}
    tasks: dict[str, TaskStatus] = {}
    for t in dag:
        rec = old_tasks.get(t.id) or TaskStatus(id=t.id, stage=t.stage.value)
        own_jobs = ctx.jobs_by_task.get(t.id, [])
        attempt = max([rec.attempts, *(j.attempt for j in own_jobs)])
        if t.id in reset or (generation_changed and rec.state == "Failed"):
            # A fresh start: failures forgotten; the old attempt's Jobs are neither counted nor kept running.
            ctx.delete += [j.name for j in own_jobs if j.state == "Active" and not j.deleting]
            rec = TaskStatus(
                id=t.id,
                stage=t.stage.value,
                attempts=attempt,
                last_failed_attempt=attempt,
                reason="Restarted" if t.id in reset else "SpecChanged",
            )
        tasks[t.id] = _step_task(ctx, t, rec, completed, counting=not spec.suspend)

    # Jobs of tasks the spec no longer has (fewer shards, a source removed) stop.
    ctx.delete += [
        j.name for j in obs.jobs if j.task_id not in tasks and j.state == "Active" and not j.deleting
    ]
    failed = [tasks[t.id] for t in dag if tasks[t.id].state == "Failed"]
    start = parse_time(old.start_time)
    # The deadline clock runs like a Job's: from the first Job, restarted when the run resumes.
    clock = parse_time(old.active_since) or start
    if old.phase == "Suspended" and not spec.suspend and clock is not None:
        clock = obs.now
    deadline_hit = bool(
        spec.active_deadline_seconds
        and clock
        and not failed
        and (obs.now - clock).total_seconds() > spec.active_deadline_seconds
    )
    all_done = all(tasks[t.id].state == "Succeeded" for t in dag)

    # Which Jobs to stop: suspend, a failed run (fail fast, free the GPUs), the run's deadline.
    stop_reason = (
        "Suspended"
        if spec.suspend
        else "RunFailed"
        if failed
        else "DeadlineExceeded"
        if deadline_hit
        else None
    )
    if stop_reason and not all_done:
        # A Job whose task's outputs are already complete is left to exit on its own: nothing to stop.
        active = [
            j
            for j in obs.jobs
            if j.state == "Active" and not j.deleting and tasks[j.task_id].state != "Succeeded"
        ]
        ctx.delete += [j.name for j in active]
        for j in active:
            rec = tasks[j.task_id]
            if rec.state == "Running":
                tasks[j.task_id] = rec.model_copy(
                    update={"state": "Pending", "reason": stop_reason, "job_names": []}
                )

    # Start what is ready.
    remaining = None
    if not stop_reason and not all_done:
        for t in dag:
            rec = tasks[t.id]
            due = parse_time(rec.next_attempt_time)
            if rec.state == "Retrying" and due and due > obs.now:
                wait = (due - obs.now).total_seconds()
                remaining = wait if remaining is None else min(remaining, wait)
                continue
            if rec.state not in ("Pending", "Retrying") or not _deps_ok(t, tasks):
                continue
            attempt = rec.attempts + 1
            left = None
            if spec.active_deadline_seconds:
                left = spec.active_deadline_seconds - ((obs.now - clock).total_seconds() if clock else 0)
            plan.create += task_manifests(obs.run, spec, t, attempt, config, active_deadline_seconds=left)
            names = task_job_names(obs.run.name, spec, t, attempt)
            tasks[t.id] = rec.model_copy(
                update={
                    "state": "Running",
                    "attempts": attempt,
                    "job_names": names,
                    "next_attempt_time": None,
                    "reason": None,
                    "message": None,
                    "start_time": rec.start_time or now_s,
                }
            )
            events.append(Event("Normal", "TaskStarted", f"{t.id}: attempt {attempt}: {', '.join(names)}"))
            start, clock = start or obs.now, clock or obs.now
    plan.requeue_after = remaining

    # Run phase and summary.
    ordered = [tasks[t.id] for t in dag]
    done_n = sum(r.state == "Succeeded" for r in ordered)
    uri = artifacts_uri(spec, obs.run.name)
    stages = Stages(
        **{
            s.value: _stage_entry(
                s, [r for r in ordered if r.stage == s.value], getattr(old.stages, s.value), uri, now_s
            )
            for s in STAGE_ORDER
        }
    )
    current_stage = next(
        (s.value for s in STAGE_ORDER if getattr(stages, s.value).state not in ("Succeeded", "Skipped")), None
    )
    if failed:
        phase, fail_reason = "Failed", failed[0].reason or "TaskFailed"
        message = f"{failed[0].id}: {failed[0].message}"
        current_stage = failed[0].stage
    elif deadline_hit:  # sticky: time only moves on
        phase, fail_reason = "Failed", "DeadlineExceeded"
        message = f"the run exceeded activeDeadlineSeconds ({spec.active_deadline_seconds}s)"
    elif all_done:
        phase, fail_reason, message = "Succeeded", None, f"all {len(dag)} tasks succeeded"
        current_stage = next(
            (s.value for s in reversed(STAGE_ORDER) if getattr(stages, s.value).state != "Skipped"), None
        )
    elif spec.suspend:
        phase, fail_reason, message = "Suspended", None, "suspended (spec.suspend: true): no Jobs run"
    else:
        started = any(r.attempts or r.state == "Succeeded" for r in ordered)
        phase, fail_reason = ("Running" if started else "Pending"), None
        st = getattr(stages, current_stage) if current_stage else None
        message = (
            f"{current_stage}: {st.succeeded}/{st.tasks} tasks done, {st.running} running"
            if st
            else "starting"
        )
        retrying = [r for r in ordered if r.state == "Retrying"]
        if retrying:
            message += f"; {retrying[0].id} retrying at {retrying[0].next_attempt_time}"

    training = {p.variant: p for p in old.training}
    for t in dag:
        if t.stage is Stage.train and t.variant in obs.progress:
            p = _progress(t.variant, obs.progress[t.variant])
            if p is not None:
                training[t.variant] = p
    progress = f"{done_n}/{len(dag)}"
    running_train = [
        training[t.variant]
        for t in dag
        if t.stage is Stage.train and t.variant in training and tasks[t.id].state == "Running"
    ]
    if phase == "Running" and running_train:  # the slowest variant decides
        progress = f"train {min(p.percent for p in running_train):.0f}%"

    conditions = _conditions(old, phase, fail_reason, message, spec, stages, gen, now_s)
    new = FusionRunStatus(
        phase=phase,
        stage=current_stage,
        progress=progress,
        message=message,
        observed_generation=gen,
        start_time=iso(start) if start else None,
        active_since=iso(clock) if clock else None,
        completion_time=(old.completion_time or now_s) if phase in ("Succeeded", "Failed") else None,
        observed_restart=restart_key or old.observed_restart,
        conditions=conditions,
        stages=stages,
        tasks=_compact(ordered) if len(ordered) > COMPACT_TASKS_ABOVE else ordered,
        training=[training[v] for v in sorted(training)],
        metrics=dict(obs.metrics) if obs.metrics is not None else old.metrics,
        artifacts_uri=uri,
    )
    events += _transition_events(old, new)
    plan.status = new
    plan.events = events
    plan.delete_jobs = sorted(set(ctx.delete))
    return plan


def _compact(tasks: list[TaskStatus]) -> list[TaskStatus]:
    slim = {"job_names": [], "start_time": None, "completion_time": None, "reason": None}
    return [t.model_copy(update=slim) if t.state in ("Succeeded", "Running", "Pending") else t for t in tasks]


def _conditions(
    old: FusionRunStatus,
    phase: str,
    fail_reason: str | None,
    message: str,
    spec: FusionRunSpec,
    stages: Stages,
    gen: int,
    now_s: str,
) -> list[Condition]:
    def c(type_: str, ok: bool, reason: str, msg: str) -> Condition:
        return _condition(old, type_, "True" if ok else "False", reason, msg, gen, now_s)

    out = [
        c("Running", phase == "Running", "Running" if phase == "Running" else phase, message),
        c(
            "Succeeded",
            phase == "Succeeded",
            "AllTasksSucceeded" if phase == "Succeeded" else phase,
            message if phase == "Succeeded" else "",
        ),
        c("Failed", phase == "Failed", fail_reason or "AsExpected", message if phase == "Failed" else ""),
        c(
            "Suspended",
            phase == "Suspended",
            "SuspendRequested" if phase == "Suspended" else "NotSuspended",
            message if phase == "Suspended" else "",
        ),
    ]
    for s in STAGE_ORDER:
        st: StageStatus = getattr(stages, s.value)
        if st.state == "Skipped":
            out.append(c(STAGE_CONDITIONS[s.value], False, "Disabled", f"{s.value} is disabled in the spec"))
        else:
            out.append(
                c(
                    STAGE_CONDITIONS[s.value],
                    st.state == "Succeeded",
                    "AllTasksSucceeded" if st.state == "Succeeded" else st.state,
                    f"{st.succeeded}/{st.tasks} tasks succeeded",
                )
            )
    return out


def _transition_events(old: FusionRunStatus, new: FusionRunStatus) -> list[Event]:
    out = []
    for s in STAGE_ORDER:
        was, now = getattr(old.stages, s.value).state, getattr(new.stages, s.value).state
        if now == "Succeeded" and was != "Succeeded":
            out.append(Event("Normal", STAGE_CONDITIONS[s.value], f"stage {s.value}: all tasks succeeded"))
    if new.phase != old.phase or (old.observed_generation is None and new.phase == "Pending"):
        kind: Literal["Normal", "Warning"] = "Warning" if new.phase == "Failed" else "Normal"
        reason = {
            "Failed": "RunFailed",
            "Succeeded": "RunSucceeded",
            "Suspended": "Suspended",
            "Running": "Resumed" if old.phase == "Suspended" else "RunStarted",
            "Pending": "Resumed" if old.phase == "Suspended" else "RunAccepted",
        }[new.phase]
        out.append(Event(kind, reason, new.message or new.phase))
    return out


def _invalid_spec(obs: Observed, error: str) -> Plan:
    """A spec that does not validate (cross-field rules the CRD schema cannot express): fail fast, stop
    running Jobs, keep the task records (a corrected spec picks up where the run was)."""
    old, gen, now_s = obs.status, obs.run.generation, iso(obs.now)
    message = error.replace("\n  ", " ")
    conditions = []
    for type_, ok, reason in (
        ("Running", False, "InvalidSpec"),
        ("Succeeded", False, "InvalidSpec"),
        ("Failed", True, "InvalidSpec"),
        ("Suspended", False, "NotSuspended"),
    ):
        conditions.append(
            _condition(old, type_, "True" if ok else "False", reason, message if ok else "", gen, now_s)
        )
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
    active = sorted(j.name for j in obs.jobs if j.state == "Active" and not j.deleting)
    return Plan(status=new, delete_jobs=active, events=events)


# --------------------------------------------------------------------------------------------------
# Writing status back


def merge_patch(old: Any, new: Any) -> Any:
    """The JSON merge patch (RFC 7386) that turns `old` into `new`: keys gone from `new` become null
    (a merge patch of just `new` would leave them behind). Lists are replaced whole."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    patch: dict[str, Any] = {}
    for k in old.keys() - new.keys():
        patch[k] = None
    for k, v in new.items():
        if k not in old:
            patch[k] = v
        elif old[k] != v:
            patch[k] = merge_patch(old[k], v) if isinstance(v, dict) and isinstance(old[k], dict) else v
    return patch
