"""Issue 13 end to end on a real control plane (the stand-in kubelet runs the real stage processes against
the real SeaweedFS S3 store): a second FusionRun that differs only in training.lambda creates no prepare /
extract / align Job, its tasks are Memoized (status, events) and its fused shards are byte for byte the
first's; deleting the first (deleteArtifacts) keeps the entries the second uses; two runs applied together
make each upstream output with exactly one Job."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from jobs.registry import Layout, Stage, Task
from tests.harness.fusionrun_k8s import RunEnv, fusionrun_env_fixture, pod_task  # noqa: F401  (fixtures)
from tests.harness.k8s import k8s_fixture, k8s_namespace_fixture, kubelet_fixture, wait_until  # noqa: F401

pytestmark = [pytest.mark.k8s, pytest.mark.s3]

UPSTREAM = ("prepare", "extract", "align")
UPSTREAM_TASKS = ["prepare", "extract-target-00000", "extract-qwen-00000", "align-qwen-00000"]
STAGE_LABEL = "fusionrun.dev/stage"
TASK_LABEL = "fusionrun.dev/task"


def spec(env: RunEnv, lam: float, **over: Any) -> dict[str, Any]:
    base = env.spec(evaluation={"enabled": False}, **over)
    return {**base, "training": {**base["training"], "lambda": lam}}


def job_tasks(env: RunEnv, run: str) -> dict[str, list[str]]:
    """The run's Jobs by stage: the tasks they were created for."""
    out: dict[str, list[str]] = {}
    for j in env.jobs(run).values():
        labels = j["metadata"]["labels"]
        out.setdefault(labels[STAGE_LABEL], []).append(labels[TASK_LABEL])
    return {stage: sorted(tasks) for stage, tasks in out.items()}


def pod_run(pod: dict[str, Any]) -> str:
    return (pod["metadata"].get("labels") or {}).get("fusionrun.dev/run", "")


def succeeded(env: RunEnv, run: str, task_id: str) -> bool:
    return env.task(run, task_id).get("state") == "Succeeded"


def fused_shard(env: RunEnv, run: str) -> bytes:
    key = f"runs/{run}/{Layout.shard(Task(Stage.fuse, shard=0, variant='fused'))}"
    return env.s3.client().get_object(Bucket=env.bucket, Key=key)["Body"].read()


def events(env: RunEnv, run: str, reason: str) -> list[str]:
    out = env.k8s.kubectl(
        "get", "events", "-o", "json", f"--field-selector=involvedObject.name={run}", namespace=env.ns
    )
    return [e["message"] for e in json.loads(out.stdout)["items"] if e["reason"] == reason]


def entries(env: RunEnv) -> dict[str, list[str]]:
    """The shared cache's complete entries (runs/_cache/<stage>/<kk>/<key>) and their users."""
    out: dict[str, list[str]] = {}
    keys = env.keys("runs/_cache/")
    for k in keys:
        parts = k.split("/")
        if parts[2] in UPSTREAM and parts[-1] == "entry.json":
            prefix = "/".join(parts[2:5])
            users = f"runs/_cache/{prefix}/users/"
            out[prefix] = sorted(u.split("/")[-1] for u in keys if u.startswith(users))
    return out


def test_another_lambda_runs_no_upstream_job_and_deleting_the_first_keeps_what_it_uses(
    fusionrun_env: RunEnv,
) -> None:
    env = fusionrun_env
    env.kubelet.hold(lambda pod: pod_task(pod) == "train")  # both runs stop at training: fuse is what counts
    env.apply("lam9", spec(env, 0.9, deleteArtifacts=True))
    wait_until(lambda: succeeded(env, "lam9", "fuse-00000"), 300, "lam9's fuse to succeed")
    assert job_tasks(env, "lam9") == {
        "prepare": ["prepare"],
        "extract": ["extract-qwen-00000", "extract-target-00000"],
        "align": ["align-qwen-00000"],
        "fuse": ["fuse-00000"],
        "train": ["train"],
    }

    env.apply("lam8", spec(env, 0.8))
    wait_until(lambda: succeeded(env, "lam8", "fuse-00000"), 300, "lam8's fuse to succeed")
    # 0 prepare / extract / align Jobs: they were memoized; fuse ran (and training waits, held)
    assert job_tasks(env, "lam8") == {"fuse": ["fuse-00000"], "train": ["train"]}
    assert fused_shard(env, "lam8") == fused_shard(env, "lam9")
    # what `kubectl get fusionrun -o yaml` shows
    doc = yaml.safe_load(env.k8s.kubectl("get", "fusionrun", "lam8", "-o", "yaml", namespace=env.ns).stdout)
    tasks = {t["id"]: t for t in doc["status"]["tasks"]}
    for task_id in UPSTREAM_TASKS:
        t = tasks[task_id]
        assert (t["state"], t["reason"], t["attempts"]) == ("Succeeded", "Memoized", 0), t
        memo = t["memoized"]
        assert (memo["hit"], memo["fromRun"], memo["fromTask"]) == (True, "lam9", task_id)
        assert len(memo["key"]) == 16
        assert t["message"] == f"outputs of lam9/{task_id} (shared cache, key {memo['key']})"
    assert (tasks["fuse-00000"]["reason"], tasks["fuse-00000"]["attempts"]) == ("Completed", 1)
    stages = doc["status"]["stages"]
    assert [stages[s].get("memoized") for s in (*UPSTREAM, "fuse")] == [1, 2, 1, None]
    assert sorted(events(env, "lam8", "TaskMemoized")) == sorted(
        f"{t}: outputs of lam9/{t} (shared cache, key {tasks[t]['memoized']['key']})" for t in UPSTREAM_TASKS
    )
    # prepare, two extractions, one alignment: one copy each, used by both runs
    assert len(entries(env)) == 4 and all(u == ["lam8", "lam9"] for u in entries(env).values())

    # Deleting lam9 with deleteArtifacts: its own prefix goes, the entries lam8 uses stay (lam8's user
    # record stays, lam9's goes), and lam8 is still complete through them.
    env.k8s.kubectl(
        "delete", "fusionrun", "lam9", "--wait=true", "--timeout=90s", namespace=env.ns, timeout=120
    )
    assert env.keys("runs/lam9/") == []
    assert len(entries(env)) == 4 and all(u == ["lam8"] for u in entries(env).values())
    assert all(succeeded(env, "lam8", t) for t in UPSTREAM_TASKS)
    assert env.operator.errors() == []


def test_two_runs_applied_together_make_each_upstream_output_once(fusionrun_env: RunEnv) -> None:
    env = fusionrun_env
    # The stand-in kubelet runs every pod on this machine: two trainings at once would both listen on the
    # rendezvous port. b's waits until a's is done (held, then released).
    b_train = env.kubelet.hold(lambda pod: pod_task(pod) == "train" and pod_run(pod) == "b")
    env.apply("a", spec(env, 0.9))
    env.apply("b", spec(env, 0.8))
    env.wait_phase("a", "Succeeded", 600)
    b_train.release()
    env.wait_phase("b", "Succeeded", 300)
    jobs = {run: job_tasks(env, run) for run in ("a", "b")}
    made_by: dict[str, str] = {}
    for task_id in UPSTREAM_TASKS:
        stage = task_id.split("-")[0]
        makers = [run for run in ("a", "b") if task_id in jobs[run].get(stage, [])]
        assert len(makers) == 1, (task_id, jobs)  # exactly one Job for it, in one of the two runs
        made_by[task_id] = makers[0]
        ran = [r for r in env.kubelet.runs.values() if r.labels.get(TASK_LABEL) == task_id]
        assert [r.exit_code for r in ran] == [0]  # and one pod ran it
    for task_id, maker in made_by.items():
        other = "b" if maker == "a" else "a"
        t = env.task(other, task_id)
        assert (t["state"], t["reason"], t["attempts"]) == ("Succeeded", "Memoized", 0), t
        assert (t["memoized"]["fromRun"], t["memoized"]["fromTask"]) == (maker, task_id)
        assert env.task(maker, task_id)["reason"] == "Completed"
    for run in ("a", "b"):  # fuse and training are each run's own
        assert jobs[run]["fuse"] == ["fuse-00000"] and jobs[run]["train"] == ["train"]
    assert fused_shard(env, "a") == fused_shard(env, "b")
    assert all(users == ["a", "b"] for users in entries(env).values()) and len(entries(env)) == 4
    assert env.operator.errors() == []
