"""The one status derivation (jobs.derive) and task-record transitions (jobs.transitions) both backends use:
the exact status fields for given records, and one task history fed to the local backend (jobs.local.TaskBook)
and to the operator (reconcile passes over the same Jobs) giving the same status document."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from fusionrun_operator.config import OperatorConfig
from fusionrun_operator.k8s_objects import LABEL_ATTEMPT, LABEL_TASK, RunRef
from fusionrun_operator.observations import JobObservation, Observed
from fusionrun_operator.reconcile import reconcile

from jobs import derive
from jobs.local import TaskBook
from jobs.plan import build_dag
from jobs.spec import parse_spec
from jobs.status import (
    Condition,
    FusionRunStatus,
    Stages,
    StageStatus,
    TaskStatus,
    TrainingProgress,
    conditions,
    stage_entry,
)
from jobs.transitions import exit_failure
from tests.test_operator_policies import pipeline
from tests.test_reconcile import spec as run_spec

T0 = datetime(2026, 11, 25, 1, 0, 0, tzinfo=timezone.utc)
NOW_S, EARLIER = "2026-11-25T01:00:00Z", "2026-11-25T00:00:00Z"
URI = "s3://bucket/runs/demo/"


def t(task: str, state: str = "Pending", **kw: Any) -> TaskStatus:
    return TaskStatus(id=task, stage=task.split("-")[0], state=state, **kw)


# --------------------------------------------------------------------------------------------------
# stages


def test_stage_entry_counts_and_state() -> None:
    tasks = [
        t("extract-a-00000", "Succeeded", attempts=1, start_time="2026-11-25T00:30:00Z"),
        t("extract-a-00001", "Running", attempts=2, job_names=["j-b", "j-a"], start_time=EARLIER),
        t("extract-b-00000", "Retrying", attempts=1),
    ]
    old, out = StageStatus(state="Running"), URI + "extract/"
    assert stage_entry(tasks, old, out, NOW_S) == StageStatus(
        state="Running",
        tasks=3,
        succeeded=1,
        running=1,
        failed=0,
        attempts=4,
        start_time=EARLIER,
        completion_time=None,
        job_names=["j-a", "j-b"],
        output_uri="s3://bucket/runs/demo/extract/",
        shards="1/3",
    )
    assert stage_entry([*tasks, t("extract-b-00001", "Failed")], old, out, NOW_S).state == "Failed"
    assert stage_entry(tasks[2:], old, out, NOW_S).state == "Retrying"
    assert stage_entry([t("extract-b-00001")], old, out, NOW_S).state == "Pending"
    assert stage_entry([], old, URI + "evaluate/", NOW_S) == StageStatus(state="Skipped")
    # Succeeded keeps its first completion time; start time stays the first one seen
    done = stage_entry(tasks[:1], StageStatus(completion_time=EARLIER), out, NOW_S)
    assert (done.state, done.completion_time, done.start_time) == (
        "Succeeded",
        EARLIER,
        "2026-11-25T00:30:00Z",
    )
    assert stage_entry(tasks[:1], StageStatus(), out, NOW_S).completion_time == NOW_S
    entries = derive.stage_entries([*tasks, t("prepare", "Succeeded")], Stages(), URI, NOW_S)
    assert entries.extract == stage_entry(tasks, StageStatus(), out, NOW_S)
    assert (entries.prepare.state, entries.prepare.output_uri) == ("Succeeded", URI + "prepare/")
    assert entries.evaluate == StageStatus(state="Skipped")


def test_stage_job_names_are_capped() -> None:
    tasks = [t(f"extract-a-{i:05d}", "Running", job_names=[f"j-{i:03d}"]) for i in range(60)]
    entry = stage_entry(tasks, StageStatus(), URI + "extract/", NOW_S)
    assert entry.running == 60 and entry.job_names == [f"j-{i:03d}" for i in range(50)]


def test_current_and_last_stage() -> None:
    st = Stages(
        prepare=StageStatus(state="Succeeded"),
        extract=StageStatus(state="Running"),
        evaluate=StageStatus(state="Skipped"),
    )
    assert derive.current_stage(st) == "extract" and derive.last_stage(st) == "train"
    done = Stages(
        **{s: StageStatus(state="Succeeded") for s in ("prepare", "extract", "align", "fuse", "train")}
    )
    assert derive.current_stage(done.model_copy(update={"evaluate": StageStatus(state="Skipped")})) is None


# --------------------------------------------------------------------------------------------------
# phase / message


def test_summary_precedence_and_messages() -> None:
    st = Stages(
        prepare=StageStatus(state="Succeeded"),
        extract=StageStatus(state="Running", tasks=4, succeeded=1, running=2),
    )
    tasks = [t("prepare", "Succeeded"), t("extract-a-00000", "Running", attempts=1)]
    failed = t("extract-a-00001", "Failed", reason="InvalidInput", message="bad")
    facts = derive.RunFacts
    deadline = facts(deadline_hit=True, deadline_seconds=60)
    assert derive.summarize([*tasks, failed], st, deadline) == derive.Summary(
        "Failed", "InvalidInput", "extract-a-00001: bad", "extract"
    )
    # a failed record without a reason or message still says which task
    assert derive.summarize([*tasks, t("fuse-00000", "Failed")], st, facts()) == derive.Summary(
        "Failed", "TaskFailed", "fuse-00000: failed", "fuse"
    )
    assert derive.summarize(tasks, st, deadline) == derive.Summary(
        "Failed", "DeadlineExceeded", "the run exceeded activeDeadlineSeconds (60s)", "extract"
    )
    all_done = [t("prepare", "Succeeded"), t("extract-a-00000", "Succeeded")]
    assert derive.summarize(all_done, st, facts(suspended=True)) == derive.Summary(
        "Succeeded", None, "all 2 tasks succeeded", "evaluate"
    )
    assert derive.summarize(tasks, st, facts(suspended=True)) == derive.Summary(
        "Suspended", None, "suspended (spec.suspend: true): no Jobs run", "extract"
    )
    assert derive.summarize(tasks, st, facts()) == derive.Summary(
        "Running", None, "extract: 1/4 tasks done, 2 running", "extract"
    )
    retrying = [*tasks, t("extract-b-00000", "Retrying", next_attempt_time=NOW_S)]
    assert derive.summarize(retrying, st, facts()).message == (
        f"extract: 1/4 tasks done, 2 running; extract-b-00000 retrying at {NOW_S}"
    )
    waiting = [*tasks, t("extract-b-00000", reason="WaitingForSharedOutput")]
    assert derive.summarize(waiting, st, facts()).message == (
        "extract: 1/4 tasks done, 2 running; 1 waiting for other runs making the same outputs"
    )
    fresh = Stages(prepare=StageStatus(state="Pending", tasks=1))
    assert derive.summarize([t("prepare")], fresh, facts()) == derive.Summary(
        "Pending", None, "prepare: 0/1 tasks done, 0 running", "prepare"
    )
    # outputs found in the store count as started, though no attempt ran
    started = [t("prepare", "Succeeded"), t("extract-a-00000")]
    assert derive.summarize(started, st, facts()).phase == "Running"


def test_a_blocked_run_waits_or_fails() -> None:
    st = Stages(prepare=StageStatus(state="Pending", tasks=1))
    secret = derive.Blocked("SecretNotFound", "Secret ml/keys does not exist yet", fatal=False)
    facts = derive.RunFacts(blocked=secret)
    assert derive.summarize([t("prepare")], st, facts) == derive.Summary(
        "Pending", None, "waiting: Secret ml/keys does not exist yet", "prepare"
    )
    opted_out = derive.Blocked("SecretNotOptedIn", "Secret ml/keys is not labelled", fatal=True)
    assert derive.summarize([t("prepare")], st, derive.RunFacts(blocked=opted_out)) == derive.Summary(
        "Failed", "SecretNotOptedIn", "Secret ml/keys is not labelled", "prepare"
    )


# --------------------------------------------------------------------------------------------------
# conditions


def test_conditions_keep_their_transition_time_until_their_status_changes() -> None:
    old = FusionRunStatus(
        conditions=[
            Condition(type="Running", status="True", last_transition_time=EARLIER),
            Condition(type="Failed", status="False", last_transition_time=EARLIER),
        ]
    )
    st = Stages(
        prepare=StageStatus(state="Succeeded", tasks=1, succeeded=1), evaluate=StageStatus(state="Skipped")
    )
    out = {
        c.type: c
        for c in conditions(
            old, phase="Failed", fail_reason="JobFailed", message="m", stages=st, gen=4, now_s=NOW_S
        )
    }
    assert list(out) == [
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
    assert out["Running"] == Condition(
        type="Running",
        status="False",
        reason="Failed",
        message="m",
        observed_generation=4,
        last_transition_time=NOW_S,
    )
    assert out["Failed"] == Condition(
        type="Failed",
        status="True",
        reason="JobFailed",
        message="m",
        observed_generation=4,
        last_transition_time=NOW_S,
    )
    assert (out["Succeeded"].reason, out["Succeeded"].message) == ("Failed", None)
    assert (out["Suspended"].reason, out["Suspended"].status) == ("NotSuspended", "False")
    assert (out["Prepared"].status, out["Prepared"].reason, out["Prepared"].message) == (
        "True",
        "AllTasksSucceeded",
        "1/1 tasks succeeded",
    )
    assert (out["Extracted"].reason, out["Extracted"].message) == ("Pending", "0/0 tasks succeeded")
    assert (out["Evaluated"].reason, out["Evaluated"].message) == (
        "Disabled",
        "evaluate is disabled in the spec",
    )
    same = conditions(old, phase="Running", fail_reason=None, message="m", stages=st, gen=4, now_s=NOW_S)
    assert same[0].last_transition_time == EARLIER and same[2].last_transition_time == EARLIER
    assert same[2].reason == "AsExpected"


# --------------------------------------------------------------------------------------------------
# training progress


def test_training_entries_and_progress_column() -> None:
    dag = pipeline(training={"clmBaseline": True}).tasks
    old = [TrainingProgress(variant="clm", step=9, total_steps=10, percent=90.0)]
    fused = TrainingProgress(variant="fused", step=1, total_steps=3, percent=33.3)
    entries = derive.training_entries(old, ["fused", "clm"], {"fused": fused})
    assert entries == {"clm": old[0], "fused": fused}
    records = {x.id: t(x.id, "Succeeded") for x in dag} | {
        "train": t("train", "Running"),
        "train-clm": t("train-clm", "Running"),
        "evaluate": t("evaluate"),
    }
    assert derive.progress_column("Running", dag, records, entries) == "train 33%"
    assert derive.progress_column("Suspended", dag, records, entries) == "9/12"
    records["train"] = t("train", "Succeeded")
    assert derive.progress_column("Running", dag, records, entries) == "train 90%"
    assert derive.progress_column("Running", dag, records, {}) == "10/12"


def test_derive_status_keeps_what_was_last_seen() -> None:
    p = pipeline(evaluation={"enabled": False})
    records = {x.id: t(x.id, "Succeeded", attempts=1) for x in p.tasks}
    old = FusionRunStatus(
        metrics={"bpb": 1.0},
        completion_time=EARLIER,
        training=[TrainingProgress(variant="fused", step=20, total_steps=20, percent=100.0)],
        stages=Stages(align=StageStatus(diagnostics={"smol": {"received": 1}})),
    )
    new = derive.derive_status(old=old, dag=p.tasks, records=records, now=T0, artifacts_uri=URI)
    assert (new.phase, new.stage, new.progress, new.message) == (
        "Succeeded",
        "train",
        "10/10",
        "all 10 tasks succeeded",
    )
    assert (new.metrics, new.completion_time, new.training) == ({"bpb": 1.0}, EARLIER, old.training)
    assert new.stages.align.diagnostics == {"smol": {"received": 1}} and new.observed_generation is None
    seen = derive.derive_status(
        old=old, dag=p.tasks, records=records, now=T0, artifacts_uri=URI, metrics={}, alignment={"x": {}}
    )
    assert (seen.metrics, seen.stages.align.diagnostics) == ({}, {"x": {}})


# --------------------------------------------------------------------------------------------------
# one history, two backends


def portable(status: FusionRunStatus) -> dict[str, Any]:
    """The status document without what only a cluster has: the spec generation it was computed for, the
    deadline clock, restartFrom applied, the Job shape and the Jobs' names."""
    doc = status.to_k8s()
    for key in ("observedGeneration", "startTime", "activeSince", "observedRestart", "jobShape"):
        doc.pop(key, None)
    for c in doc["conditions"]:
        c.pop("observedGeneration", None)
    for entry in [*doc["tasks"], *doc["stages"].values()]:
        entry.pop("jobNames", None)
    return doc


class Cluster:
    """The operator, one reconcile pass per step, over Jobs that did what the history says."""

    def __init__(self) -> None:
        self.status, self.jobs = FusionRunStatus(), {}

    def step(self, now: datetime, completed: set[str], **finished: JobObservation) -> FusionRunStatus:
        self.jobs.update(finished)
        obs = Observed(
            run=RunRef("demo", "ml", "uid-1", 1),
            spec=run_spec(),
            status=self.status,
            jobs=list(self.jobs.values()),
            now=now,
            completed=frozenset(completed),
        )
        fx = reconcile(obs, OperatorConfig(job_image="img:1"))
        for o in fx.create:  # the Jobs it asked for are there at the next pass
            meta = o["metadata"]
            task, attempt = meta["labels"][LABEL_TASK], int(meta["labels"][LABEL_ATTEMPT])
            self.jobs[meta["name"]] = JobObservation(meta["name"], task, attempt, None, "Active", 1)
        self.status = fx.status
        return fx.status


def ended(name: str, task: str, attempt: int, code: int, said: str | None = None) -> dict[str, Any]:
    state = "Succeeded" if code == 0 else "Failed"
    code_seen = code or None
    job = JobObservation(name, task, attempt, None, state, 1, exit_code=code_seen, termination_message=said)
    return {name: job}


def test_the_same_task_history_gives_both_backends_the_same_status() -> None:
    """prepare fails once (exit 1) and succeeds on its retry; the four extractions start; the target's
    fails with bad input (exit 2), which fails the run and stops the other three."""
    spec = parse_spec(run_spec())
    book = TaskBook(build_dag(spec), spec.retry, URI)
    cluster = Cluster()
    extracts = [x.id for x in book.dag if x.stage.value == "extract"]
    store_down = "prepare: the store did not answer"
    bad_model = "extract: model target (/models/nothing) will not load"
    at = [T0 + timedelta(seconds=s) for s in (0, 5, 15, 20, 30)]

    def local(now: datetime) -> FusionRunStatus:
        return book.derive(now=now)

    steps: list[tuple[FusionRunStatus, FusionRunStatus]] = []
    book.started("prepare", now=at[0])
    steps.append((local(at[0]), cluster.step(at[0], set())))
    book.exited("prepare", exit_code=1, said=store_down, now=at[1])
    first = ended("demo-prepare-1", "prepare", 1, 1, store_down)
    steps.append((local(at[1]), cluster.step(at[1], set(), **first)))
    book.started("prepare", now=at[2])
    steps.append((local(at[2]), cluster.step(at[2], set())))
    book.completed("prepare", now=at[3])
    for x in extracts:
        book.started(x, now=at[3])
    second = ended("demo-prepare-2", "prepare", 2, 0)
    steps.append((local(at[3]), cluster.step(at[3], {"prepare"}, **second)))
    book.exited(extracts[0], exit_code=2, said=bad_model, now=at[4])
    book.stopped(reason="RunFailed")
    failed = ended(f"demo-{extracts[0]}-1", extracts[0], 1, 2, bad_model)
    steps.append((local(at[4]), cluster.step(at[4], {"prepare"}, **failed)))

    for mine, theirs in steps:
        assert portable(mine) == portable(theirs)
    said = [(s.phase, s.stage, s.progress, s.message) for s, _ in steps]
    assert said == [
        ("Running", "prepare", "0/11", "prepare: 0/1 tasks done, 1 running"),
        (
            "Running",
            "prepare",
            "0/11",
            "prepare: 0/1 tasks done, 0 running; prepare retrying at 2026-11-25T01:00:15Z",
        ),
        ("Running", "prepare", "0/11", "prepare: 0/1 tasks done, 1 running"),
        ("Running", "extract", "1/11", "extract: 0/4 tasks done, 4 running"),
        (
            "Failed",
            "extract",
            "1/11",
            "extract-target-00000: attempt 1 exited with code 2 (bad input: retrying cannot help; see its "
            f"log, fix the spec or the inputs): {bad_model} (permanent error)",
        ),
    ]
    retried, last = steps[1][0].task("prepare"), steps[-1][0]
    assert retried.message == f"attempt 1 failed with exit code 1: {store_down}; retry 2 of 3 in 10s"
    assert exit_failure(attempt=1, exit_code=1, said=store_down).reason == retried.reason == "JobFailed"
    done = last.task("prepare")
    assert (done.state, done.reason, done.attempts, done.failures, done.start_time, done.completion_time) == (
        "Succeeded",
        "Completed",
        2,
        1,
        NOW_S,
        "2026-11-25T01:00:20Z",
    )
    assert [(r.id, r.state, r.reason) for r in last.tasks[2:5]] == [
        (x, "Pending", "RunFailed") for x in extracts[1:]
    ]
    assert (last.condition("Failed").reason, last.completion_time) == ("InvalidInput", "2026-11-25T01:00:30Z")
