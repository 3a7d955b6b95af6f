"""Reconciliation, pure: (spec, status, owned Jobs and their pods, store state, now) -> Effects (Jobs and
Services to create, Jobs to delete, store manifests to invalidate, events, the new status).

Level-based and idempotent: the same observations give the same answer, so operator restarts and
duplicate events never create anything twice (Job names are deterministic; 409 AlreadyExists is success).
This is the engine only: every rule is a policy in policies/ (see its table); the I/O modules gather the
inputs (kube, store_view) and carry out the effects (kube.apply_effects, store_view.invalidate).

One pass: parse the spec (once; an invalid one fails the run), restartFrom / generation fresh starts, each
task's transition, stop Jobs of tasks the spec no longer has, then either stop the run's Jobs (suspend, a
failed task, the deadline) or start what is ready (unless the run's credentials Secret may not be used;
what the shared cache already has is adopted instead, what another run makes now waits: policies.memoize),
and render the status with the CredentialsReady / StoreReadable conditions the pass checked.
"""

from __future__ import annotations

from fusionrun_operator.config import OperatorConfig
from fusionrun_operator.effects import Effects
from fusionrun_operator.observations import Observed
from fusionrun_operator.pipeline import InvalidSpec, Pipeline, parse_pipeline
from fusionrun_operator.policies.credentials import (
    CREDENTIALS_READY,
    STORE_READABLE,
    access_conditions,
    blocked_run,
    blocking,
)
from fusionrun_operator.policies.deadline import (
    deadline_clock,
    deadline_passed,
    seconds_left,
    stop_jobs,
    stop_reason,
)
from fusionrun_operator.policies.invalid_spec import invalid_spec
from fusionrun_operator.policies.restart import Restart, completed_now, fresh_start, plan_restart
from fusionrun_operator.policies.start import StartInputs, start_ready
from fusionrun_operator.policies.status import StatusInputs, render_status
from fusionrun_operator.policies.transition import TaskInputs, step_task
from fusionrun_operator.times import iso
from jobs.derive import RunFacts
from jobs.status import TaskStatus


def reconcile(
    obs: Observed, config: OperatorConfig, pipeline: Pipeline | InvalidSpec | None = None
) -> Effects:
    """pipeline: obs.spec parsed once for this pass (parse_pipeline); parsed here when not given."""
    pipe = pipeline if pipeline is not None else parse_pipeline(obs.spec, config)
    if isinstance(pipe, InvalidSpec):
        return invalid_spec(obs, pipe.message)
    spec, old, now = pipe.spec, obs.status, obs.now
    restart = plan_restart(pipe, old, obs.run.generation)
    fx = Effects(status=old, invalidate=list(restart.invalidate), events=list(restart.events))
    records = _step_tasks(obs, pipe, restart, fx, config)
    # Jobs of tasks the spec no longer has (fewer shards, a source removed) stop.
    fx.delete_jobs += [j.name for j in obs.jobs if j.task_id not in records and j.running]

    failed = [r for r in records.values() if r.state == "Failed"]
    clock = deadline_clock(old, spec, now)
    deadline_hit = deadline_passed(spec, clock, now, bool(failed))
    all_done = all(r.state == "Succeeded" for r in records.values())
    reason = stop_reason(spec, bool(failed), deadline_hit)
    blocked = blocking(obs.credentials)  # Jobs already running go on; no new one gets the Secret
    if reason and not all_done:
        stopped, delete = stop_jobs(obs.jobs, records, reason)
        records.update(stopped)
        fx.delete_jobs += delete
    elif not reason and not all_done and blocked is None:
        inputs = StartInputs(obs.run, spec, config, now, obs.shared)
        started, fx.requeue_after = start_ready(pipe.tasks, records, inputs, seconds_left(spec, clock, now))
        for tr in started:
            records[tr.record.id] = fx.take(tr)
        if any(tr.create for tr in started):  # the deadline counts from the first Job (not an adoption)
            clock = clock.started(now)

    facts = RunFacts(deadline_hit, spec.active_deadline_seconds, spec.suspend, blocked_run(blocked))
    status_inputs = StatusInputs(
        run_name=obs.run.name,
        generation=obs.run.generation,
        now=now,
        progress=obs.progress,
        metrics=obs.metrics,
        restart_key=restart.key,
        alignment=obs.alignment,
        server=config.server,
    )
    fx.status, events = render_status(old, pipe, records, facts, clock, status_inputs)
    checks = {CREDENTIALS_READY: obs.credentials, STORE_READABLE: obs.store_access}
    conditions, access_events = access_conditions(old, checks, obs.run.generation, iso(now))
    fx.status.conditions = [*fx.status.conditions, *conditions]
    fx.events += [*access_events, *events]
    fx.delete_jobs = sorted(set(fx.delete_jobs))
    return fx


def _step_tasks(
    obs: Observed, pipe: Pipeline, restart: Restart, fx: Effects, config: OperatorConfig
) -> dict[str, TaskStatus]:
    """Every task's new record in DAG order (fresh starts first), accumulating their effects in fx."""
    jobs_by_task = obs.jobs_by_task()
    old = {t.id: t for t in obs.status.tasks}
    inputs = TaskInputs(
        spec=pipe.spec,
        generation=obs.run.generation,
        completed=completed_now(obs.completed, restart),
        counting=not pipe.spec.suspend,
        now=obs.now,
        server=config.server,
        made_from=obs.made_from,
    )
    records: dict[str, TaskStatus] = {}
    for task in pipe.tasks:
        jobs = jobs_by_task.get(task.id, [])
        rec = old.get(task.id) or TaskStatus(id=task.id, stage=task.stage.value)
        rec = fx.take(fresh_start(task, rec, jobs, restart))
        records[task.id] = fx.take(step_task(task, rec, jobs, inputs))
    return records
