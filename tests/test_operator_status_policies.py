"""reconcile's status rendering policies one by one (progress, events, compaction, status, invalid_spec): the
exact status fields and events for given task records. What both backends derive alike (stages, phase,
message, conditions, the progress column) is tested in test_status_derivation.py."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from fusionrun_operator.effects import Event
from fusionrun_operator.k8s_objects import RunRef
from fusionrun_operator.observations import JobObservation, Observed
from fusionrun_operator.policies import compaction, events, progress
from fusionrun_operator.policies.deadline import Clock
from fusionrun_operator.policies.invalid_spec import invalid_spec
from fusionrun_operator.policies.status import StatusInputs, render_status

from jobs.derive import RunFacts
from jobs.status import Condition, FusionRunStatus, Stages, StageStatus, TaskStatus, TrainingProgress
from tests.test_operator_policies import pipeline

T0 = datetime(2026, 11, 25, 1, 0, 0, tzinfo=timezone.utc)
NOW_S, EARLIER = "2026-11-25T01:00:00Z", "2026-11-25T00:00:00Z"
URI = "s3://bucket/runs/demo/"


def t(task: str, state: str = "Pending", **kw: Any) -> TaskStatus:
    return TaskStatus(id=task, stage=task.split("-")[0], state=state, **kw)


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
    train_tasks = pipeline(training={"clmBaseline": True}).train_tasks
    found = {"fused": {"step": 1, "total_steps": 3}, "clm": {"step": "bad"}, "self": {"step": 1}}
    assert progress.progress_entries(train_tasks, found) == {
        "fused": TrainingProgress(variant="fused", step=1, total_steps=3, percent=33.3)
    }


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
    progress = {"fused": {"step": 5, "total_steps": 20}}
    inp = StatusInputs(
        run_name="demo", generation=3, now=T0, progress=progress, metrics=None, restart_key=None
    )
    new, evs = render_status(old, p, records, RunFacts(), Clock(T0, T0), inp)
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
    inp = StatusInputs(
        run_name="demo", generation=3, now=T0, progress={}, metrics={"bpb": 1.0}, restart_key="train/2"
    )
    fin, evs = render_status(new, p, records, RunFacts(), Clock(T0, T0), inp)
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
