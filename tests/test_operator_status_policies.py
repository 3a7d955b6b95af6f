"""reconcile's status rendering policies one by one (policies/stages, phase, conditions, progress, events,
compaction, status, invalid_spec): the exact status fields and events for given task records."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from fusionrun_operator.effects import Event
from fusionrun_operator.k8s_objects import RunRef
from fusionrun_operator.observations import JobObservation, Observed
from fusionrun_operator.policies import compaction, conditions, events, phase, progress, stages
from fusionrun_operator.policies.deadline import Clock
from fusionrun_operator.policies.invalid_spec import invalid_spec
from fusionrun_operator.policies.status import StatusInputs, render_status

from jobs.status import Condition, FusionRunStatus, Stages, StageStatus, TaskStatus, TrainingProgress
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
    old = StageStatus(state="Running")
    entry = stages.stage_entry("extract", tasks, old, URI, NOW_S)
    assert entry == StageStatus(
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
    assert (
        stages.stage_entry("extract", [*tasks, t("extract-b-00001", "Failed")], old, URI, NOW_S).state
        == "Failed"
    )
    assert stages.stage_entry("extract", tasks[2:], old, URI, NOW_S).state == "Retrying"
    assert stages.stage_entry("extract", [t("extract-b-00001")], old, URI, NOW_S).state == "Pending"
    assert stages.stage_entry("evaluate", [], old, URI, NOW_S) == StageStatus(state="Skipped")
    # Succeeded keeps its first completion time; start time stays the first one seen
    done = stages.stage_entry("extract", tasks[:1], StageStatus(completion_time=EARLIER), URI, NOW_S)
    assert (done.state, done.completion_time, done.start_time) == (
        "Succeeded",
        EARLIER,
        "2026-11-25T00:30:00Z",
    )
    assert stages.stage_entry("extract", tasks[:1], StageStatus(), URI, NOW_S).completion_time == NOW_S


def test_stage_job_names_are_capped() -> None:
    tasks = [t(f"extract-a-{i:05d}", "Running", job_names=[f"j-{i:03d}"]) for i in range(60)]
    entry = stages.stage_entry("extract", tasks, StageStatus(), URI, NOW_S)
    assert entry.running == 60 and entry.job_names == [f"j-{i:03d}" for i in range(50)]


def test_current_and_last_stage() -> None:
    st = Stages(
        prepare=StageStatus(state="Succeeded"),
        extract=StageStatus(state="Running"),
        evaluate=StageStatus(state="Skipped"),
    )
    assert stages.current_stage(st) == "extract" and stages.last_stage(st) == "train"
    done = Stages(
        **{s: StageStatus(state="Succeeded") for s in ("prepare", "extract", "align", "fuse", "train")}
    )
    assert stages.current_stage(done.model_copy(update={"evaluate": StageStatus(state="Skipped")})) is None


# --------------------------------------------------------------------------------------------------
# phase / message


def facts(**kw: Any) -> phase.RunFacts:
    base: dict[str, Any] = {
        "failed": [],
        "deadline_hit": False,
        "deadline_seconds": None,
        "all_done": False,
        "suspended": False,
    }
    return phase.RunFacts(**(base | kw))


def test_summary_precedence_and_messages() -> None:
    st = Stages(
        prepare=StageStatus(state="Succeeded"),
        extract=StageStatus(state="Running", tasks=4, succeeded=1, running=2),
    )
    tasks = [t("prepare", "Succeeded"), t("extract-a-00000", "Running", attempts=1)]
    failed = t("extract-a-00001", "Failed", reason="InvalidInput", message="bad")
    assert phase.summarize(
        facts(failed=[failed], deadline_hit=True, all_done=True), tasks, st
    ) == phase.Summary("Failed", "InvalidInput", "extract-a-00001: bad", "extract")
    assert phase.summarize(facts(failed=[t("fuse-00000", "Failed")]), tasks, st).fail_reason == "TaskFailed"
    assert phase.summarize(facts(deadline_hit=True, deadline_seconds=60), tasks, st) == phase.Summary(
        "Failed", "DeadlineExceeded", "the run exceeded activeDeadlineSeconds (60s)", "extract"
    )
    assert phase.summarize(facts(all_done=True, suspended=True), tasks, st).message == "all 2 tasks succeeded"
    assert phase.summarize(facts(suspended=True), tasks, st) == phase.Summary(
        "Suspended", None, "suspended (spec.suspend: true): no Jobs run", "extract"
    )
    assert phase.summarize(facts(), tasks, st) == phase.Summary(
        "Running", None, "extract: 1/4 tasks done, 2 running", "extract"
    )
    retrying = [*tasks, t("extract-b-00000", "Retrying", next_attempt_time=NOW_S)]
    assert phase.summarize(facts(), retrying, st).message == (
        f"extract: 1/4 tasks done, 2 running; extract-b-00000 retrying at {NOW_S}"
    )
    fresh = Stages(prepare=StageStatus(state="Pending", tasks=1))
    assert phase.summarize(facts(), [t("prepare")], fresh) == phase.Summary(
        "Pending", None, "prepare: 0/1 tasks done, 0 running", "prepare"
    )
    # outputs found in the store count as started, though no Job ran
    assert phase.summarize(facts(), [t("prepare", "Succeeded"), t("extract-a-00000")], st).phase == "Running"


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
    out = {c.type: c for c in conditions.run_conditions(old, "Failed", "JobFailed", "m", st, 4, NOW_S)}
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
    same = conditions.run_conditions(old, "Running", None, "m", st, 4, NOW_S)
    assert same[0].last_transition_time == EARLIER and same[2].last_transition_time == EARLIER
    assert same[2].reason == "AsExpected"


# --------------------------------------------------------------------------------------------------
# training progress


def test_progress_file_to_status() -> None:
    raw = {
        "step": 45,
        "total_steps": 90,
        "loss": 2.5,
        "lr": float("nan"),
        "tokens_per_s": "fast",
        "updated_at": 7,
    }
    assert progress.parse_progress("fused", raw) == TrainingProgress(
        variant="fused", step=45, total_steps=90, percent=50.0, loss=2.5, updated_at="7"
    )
    assert progress.parse_progress("clm", {"step": 3, "total_steps": 0}).percent == 0.0
    assert progress.parse_progress("clm", {"step": "many"}) is None


def test_training_entries_and_progress_column() -> None:
    p = pipeline(training={"clmBaseline": True})
    train_tasks = p.train_tasks
    assert [x.id for x in train_tasks] == ["train", "train-clm"]
    old = [TrainingProgress(variant="clm", step=9, total_steps=10, percent=90.0)]
    raw = {"fused": {"step": 1, "total_steps": 3}, "clm": {"step": "bad"}}
    entries = progress.training_entries(old, train_tasks, raw)
    assert entries == {
        "clm": old[0],
        "fused": TrainingProgress(variant="fused", step=1, total_steps=3, percent=33.3),
    }
    records = {"train": t("train", "Running"), "train-clm": t("train-clm", "Running")}
    tasks = [t("prepare", "Succeeded"), *records.values()]
    assert progress.progress_column("Running", tasks, train_tasks, entries, records) == "train 33%"
    assert progress.progress_column("Suspended", tasks, train_tasks, entries, records) == "1/3"
    records["train"] = t("train", "Succeeded")
    assert progress.progress_column("Running", tasks, train_tasks, entries, records) == "train 90%"


# --------------------------------------------------------------------------------------------------
# transition events, compaction


def test_transition_events() -> None:
    running = FusionRunStatus(phase="Running", observed_generation=1)
    done = running.model_copy(
        update={
            "phase": "Succeeded",
            "message": "all 11 tasks succeeded",
            "stages": Stages(evaluate=StageStatus(state="Succeeded")),
        }
    )
    assert events.transition_events(running, done) == [
        Event("Normal", "Evaluated", "stage evaluate: all tasks succeeded"),
        Event("Normal", "RunSucceeded", "all 11 tasks succeeded"),
    ]
    assert events.transition_events(done, done) == []
    failed = running.model_copy(update={"phase": "Failed", "message": "x: boom"})
    assert events.transition_events(running, failed) == [Event("Warning", "RunFailed", "x: boom")]
    suspended = running.model_copy(update={"phase": "Suspended"})
    assert events.transition_events(suspended, running) == [Event("Normal", "Resumed", "Running")]
    assert events.transition_events(suspended, FusionRunStatus(phase="Pending")) == [
        Event("Normal", "Resumed", "Pending")
    ]
    # the very first pass of a run announces it even though Pending is the default phase
    first = FusionRunStatus(phase="Pending", message="prepare: 0/1 tasks done, 0 running")
    assert events.transition_events(FusionRunStatus(), first) == [
        Event("Normal", "RunAccepted", "prepare: 0/1 tasks done, 0 running")
    ]
    assert events.transition_events(FusionRunStatus(), running) == [Event("Normal", "RunStarted", "Running")]


def test_compaction_above_the_threshold_keeps_failures_whole() -> None:
    full = {"job_names": ["j"], "start_time": NOW_S, "completion_time": NOW_S, "reason": "Completed"}
    few = [t(f"fuse-{i:05d}", "Succeeded", **full) for i in range(compaction.COMPACT_TASKS_ABOVE)]
    assert compaction.compact(few) == few
    many = [
        *few,
        t("fuse-99999", "Failed", **full),
        t("fuse-99998", "Retrying", **full),
        t("x-1", "Running", **full),
    ]
    out = compaction.compact(many)
    assert out[0] == t("fuse-00000", "Succeeded") and out[-1] == t("x-1", "Running")
    assert out[-3:-1] == many[-3:-1]


# --------------------------------------------------------------------------------------------------
# the whole status, and an invalid spec


def test_render_status_composes_the_policies() -> None:
    p = pipeline(evaluation={"enabled": False})
    records = {x.id: t(x.id, "Succeeded", attempts=1) for x in p.tasks}
    records["train"] = t("train", "Running", attempts=2, start_time=EARLIER)
    old = FusionRunStatus(
        phase="Running", observed_generation=2, metrics={"old": 1}, observed_restart="fuse/1"
    )
    inp = StatusInputs("demo", 3, T0, {"fused": {"step": 5, "total_steps": 20}}, None, None)
    f = facts()
    new, evs = render_status(old, p, records, f, Clock(T0, T0), inp)
    assert (new.phase, new.stage, new.progress, new.message) == (
        "Running",
        "train",
        "train 25%",
        "train: 0/1 tasks done, 1 running",
    )
    assert (new.observed_generation, new.start_time, new.active_since, new.completion_time) == (
        3,
        NOW_S,
        NOW_S,
        None,
    )
    assert (new.observed_restart, new.metrics, new.artifacts_uri) == ("fuse/1", {"old": 1}, URI)
    assert [x.id for x in new.tasks] == [x.id for x in p.tasks] and new.training[0].percent == 25.0
    assert new.stages.evaluate.state == "Skipped" and new.stages.fuse.state == "Succeeded"
    assert [e.reason for e in evs] == ["JobShape", "Prepared", "Extracted", "Aligned", "Fused"]
    assert new.job_shape == "PerTask" and evs[0].message.startswith("Jobs: PerTask (one Job per task")
    records["train"] = t("train", "Succeeded", attempts=2)
    inp = StatusInputs("demo", 3, T0, {}, {"bpb": 1.0}, "train/2")
    fin, evs = render_status(new, p, records, facts(all_done=True), Clock(T0, T0), inp)
    assert (fin.phase, fin.stage, fin.progress, fin.completion_time) == ("Succeeded", "train", "10/10", NOW_S)
    assert (fin.metrics, fin.observed_restart) == ({"bpb": 1.0}, "train/2")
    assert evs == [
        Event("Normal", "Trained", "stage train: all tasks succeeded"),
        Event("Normal", "RunSucceeded", "all 10 tasks succeeded"),
    ]


def test_invalid_spec_fails_the_run_keeps_tasks_and_stops_jobs() -> None:
    old = FusionRunStatus(
        phase="Running",
        tasks=[t("prepare", "Running", attempts=1)],
        conditions=[
            Condition(type="Running", status="True", last_transition_time=EARLIER),
            Condition(type="Prepared", status="False", reason="Running", last_transition_time=EARLIER),
        ],
    )
    jobs = [
        JobObservation("demo-prepare-1", "prepare", 1, None, "Active"),
        JobObservation("demo-x-1", "x", 1, None, "Active", deleting=True),
        JobObservation("demo-y-1", "y", 1, None, "Failed"),
    ]
    obs = Observed(run=RunRef("demo", "ml", "uid", 5), spec={}, status=old, jobs=jobs, now=T0)
    fx = invalid_spec(obs, "invalid FusionRun:\n  spec.sources: bad")
    msg = "invalid FusionRun: spec.sources: bad"
    assert (fx.status.phase, fx.status.message, fx.status.observed_generation) == ("Failed", msg, 5)
    assert fx.status.tasks == old.tasks and fx.status.completion_time == NOW_S
    assert [(c.type, c.status, c.reason) for c in fx.status.conditions] == [
        ("Running", "False", "InvalidSpec"),
        ("Succeeded", "False", "InvalidSpec"),
        ("Failed", "True", "InvalidSpec"),
        ("Suspended", "False", "NotSuspended"),
        ("Prepared", "False", "Running"),
    ]
    assert fx.status.conditions[4].last_transition_time == EARLIER  # other conditions kept as they were
    assert (fx.delete_jobs, fx.create, fx.invalidate) == (["demo-prepare-1"], [], [])
    assert fx.events == [Event("Warning", "InvalidSpec", msg)]
    assert (
        invalid_spec(
            Observed(run=obs.run, spec={}, status=fx.status, jobs=[], now=T0), msg.replace(": s", ":\n  s")
        ).events
        == []
    )
