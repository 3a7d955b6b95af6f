"""The one status derivation (jobs.derive) both backends use: the exact status fields for given records."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from jobs import derive
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
from tests.test_operator_policies import pipeline

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
    out = {c.type: c for c in conditions(old, "Failed", "JobFailed", "m", st, 4, NOW_S)}
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
    same = conditions(old, "Running", None, "m", st, 4, NOW_S)
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
