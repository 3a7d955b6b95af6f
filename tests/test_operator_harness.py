"""The Kubernetes test harness itself, against the real control plane: plain Jobs run by the stand-in
kubelet and completed (or failed) by the real job controller. The operator's integration tests rely on
exactly these behaviours, so they are pinned here with plain Jobs first."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.harness.k8s import (  # noqa: F401  (fixtures)
    ControlPlane,
    k8s_fixture,
    k8s_namespace_fixture,
    kubelet_fixture,
    wait_until,
)
from tests.harness.kubelet import (
    StandInKubelet,
    expand_var_refs,
    job_name_startswith,
    rewrite_cluster_dns,
    rewrite_mount_paths,
)

pytestmark = pytest.mark.k8s


def job(
    name: str,
    script: str,
    *,
    env: list[dict[str, Any]] | None = None,
    backoff_limit: int = 0,
    scratch: bool = False,
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "main",
        "image": "fusionrun:test",
        "command": ["python", "-c", script],
        "env": env or [],
    }
    pod: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
    if scratch:  # an emptyDir at /scratch, as the operator's stage pods have
        pod["volumes"] = [{"name": "scratch", "emptyDir": {}}]
        container["volumeMounts"] = [{"name": "scratch", "mountPath": "/scratch"}]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {"backoffLimit": backoff_limit, "template": {"spec": pod}},
    }


def job_status(cp: ControlPlane, ns: str, name: str) -> dict[str, Any]:
    return client.BatchV1Api(cp.api()).read_namespaced_job_status(name, ns).to_dict()["status"] or {}


def job_condition(cp: ControlPlane, ns: str, name: str) -> dict[str, Any] | None:
    conds = job_status(cp, ns, name).get("conditions") or []
    return next((c for c in conds if c["status"] == "True" and c["type"] in ("Complete", "Failed")), None)


def test_pure_helpers() -> None:
    assert rewrite_cluster_dns("run1-train-0.run1-train.ns1.svc.cluster.local") == "127.0.0.1"
    assert rewrite_cluster_dns("run1-train-0.run1-train.ns1.svc") == "127.0.0.1"
    assert (
        rewrite_cluster_dns("http://s3.minio.svc.cluster.local:9000/bucket") == "http://127.0.0.1:9000/bucket"
    )
    assert rewrite_cluster_dns("s3.amazonaws.com") == "s3.amazonaws.com"
    assert rewrite_cluster_dns("svc") == "svc"
    assert expand_var_refs("$(A)-$(B)-$$(A)", {"A": "x"}) == "x-$(B)-$(A)"
    mounts = {"/scratch": "/t/p/volumes/scratch"}
    assert rewrite_mount_paths("/scratch/tmp", mounts) == "/t/p/volumes/scratch/tmp"
    assert rewrite_mount_paths("/scratch", mounts) == "/t/p/volumes/scratch"
    assert rewrite_mount_paths("/scratchy", mounts) == "/scratchy"


def test_job_runs_with_pod_env_and_completes(
    k8s: ControlPlane,
    k8s_namespace: str,
    kubelet: StandInKubelet,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ns = k8s_namespace
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "host-secret")
    client.CoreV1Api(k8s.api()).create_namespaced_secret(
        ns, {"metadata": {"name": "s3-keys"}, "stringData": {"AWS_ACCESS_KEY_ID": "key-123"}}
    )
    out = tmp_path / "env.json"
    names = [
        "PLAIN",
        "FROM_SECRET",
        "POD_NAME",
        "POD_NS",
        "MASTER_ADDR",
        "EXPANDED",
        "OMP_NUM_THREADS",
        "HOME",
        "TMPDIR",
        "AWS_SECRET_ACCESS_KEY",
    ]
    script = textwrap.dedent(f"""
        import json, os, sys
        json.dump({{"env": {{k: os.environ.get(k) for k in {names!r}}}, "cwd": os.getcwd(),
                   "python": sys.executable}}, open({str(out)!r}, "w"))
    """)
    env = [
        {"name": "PLAIN", "value": "plain-value"},
        {
            "name": "FROM_SECRET",
            "valueFrom": {"secretKeyRef": {"name": "s3-keys", "key": "AWS_ACCESS_KEY_ID"}},
        },
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "MASTER_ADDR", "value": f"r-train-0.r-train.{ns}.svc.cluster.local"},
        {"name": "EXPANDED", "value": "$(PLAIN)/$(POD_NS)"},
        {"name": "HOME", "value": "/scratch"},
        {"name": "TMPDIR", "value": "/scratch/tmp"},  # not created by anyone: Python falls back to /tmp
    ]
    client.BatchV1Api(k8s.api()).create_namespaced_job(ns, job("env-check", script, env=env, scratch=True))

    cond = wait_until(lambda: job_condition(k8s, ns, "env-check"), 60, "Job env-check to finish")
    assert cond["type"] == "Complete", kubelet.all_logs()
    [run] = kubelet.runs_matching({"job-name": "env-check"})
    got = json.loads(out.read_text())
    pod_dir = kubelet.log_dir.parent / "pods" / run.name
    assert got["env"] == {
        "PLAIN": "plain-value",
        "FROM_SECRET": "key-123",
        "POD_NAME": run.name,
        "POD_NS": ns,
        "MASTER_ADDR": "127.0.0.1",
        "EXPANDED": f"plain-value/{ns}",
        "OMP_NUM_THREADS": "1",
        # The emptyDir is a folder of the pod's own, and so is its /tmp; nothing from the test process's
        # environment that the pod did not ask for.
        "HOME": str(pod_dir / "volumes" / "scratch"),
        "TMPDIR": str(pod_dir / "tmp"),
        "AWS_SECRET_ACCESS_KEY": None,
    }
    assert got["cwd"] == str(Path(__file__).resolve().parents[1])
    assert Path(got["python"]).parent == Path(kubelet.python).parent
    status = job_status(k8s, ns, "env-check")
    assert (status.get("succeeded"), status.get("failed")) == (1, None)
    pod = client.CoreV1Api(k8s.api()).read_namespaced_pod(run.name, ns)
    assert pod.status.phase == "Succeeded"
    assert pod.status.container_statuses[0].state.terminated.exit_code == 0


def test_injected_failure_is_retried_by_the_job_controller(
    k8s: ControlPlane, k8s_namespace: str, kubelet: StandInKubelet
) -> None:
    ns = k8s_namespace
    fault = kubelet.fail(job_name_startswith("flaky"), exit_code=3, times=1)
    client.BatchV1Api(k8s.api()).create_namespaced_job(ns, job("flaky", "print('ok')", backoff_limit=2))

    cond = wait_until(lambda: job_condition(k8s, ns, "flaky"), 90, "Job flaky to finish")
    assert cond["type"] == "Complete"
    status = job_status(k8s, ns, "flaky")
    assert (status.get("succeeded"), status.get("failed")) == (1, 1)
    runs = sorted(kubelet.runs_matching({"job-name": "flaky"}), key=lambda r: r.started)
    assert [(r.injected, r.exit_code) for r in runs] == [(True, 3), (False, 0)]
    assert fault.hits == 1


def test_permanent_failure_fails_the_job_with_the_exit_code(
    k8s: ControlPlane, k8s_namespace: str, kubelet: StandInKubelet
) -> None:
    ns = k8s_namespace
    client.BatchV1Api(k8s.api()).create_namespaced_job(ns, job("broken", "import sys; sys.exit(7)"))

    cond = wait_until(lambda: job_condition(k8s, ns, "broken"), 60, "Job broken to finish")
    assert (cond["type"], cond["reason"]) == ("Failed", "BackoffLimitExceeded")
    [run] = kubelet.runs_matching({"job-name": "broken"})
    assert (run.injected, run.exit_code) == (False, 7)
    pod = client.CoreV1Api(k8s.api()).read_namespaced_pod(run.name, ns)
    assert pod.status.phase == "Failed"
    assert pod.status.container_statuses[0].state.terminated.exit_code == 7


def test_deleting_a_job_kills_its_running_process(
    k8s: ControlPlane, k8s_namespace: str, kubelet: StandInKubelet
) -> None:
    ns = k8s_namespace
    batch = client.BatchV1Api(k8s.api())
    batch.create_namespaced_job(ns, job("sleeper", "import time; time.sleep(120)"))
    wait_until(lambda: kubelet.runs_matching({"job-name": "sleeper"}), 30, "the sleeper pod to start")
    batch.delete_namespaced_job("sleeper", ns, propagation_policy="Background")

    # The garbage collector in kube-controller-manager deletes the pod; the stand-in kills the process.
    [run] = wait_until(
        lambda: [r for r in kubelet.runs_matching({"job-name": "sleeper"}) if r.finished],
        60,
        "the sleeper's process to be killed",
    )
    assert run.killed and run.exit_code not in (0, None)
    assert client.CoreV1Api(k8s.api()).list_namespaced_pod(ns).items == []


def test_missing_secret_keeps_the_pod_pending_until_it_exists(
    k8s: ControlPlane, k8s_namespace: str, kubelet: StandInKubelet
) -> None:
    ns = k8s_namespace
    core = client.CoreV1Api(k8s.api())
    env = [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "late", "key": "k"}}}]
    script = "import os, sys; sys.exit(0 if os.environ['K'] == 'v' else 1)"
    client.BatchV1Api(k8s.api()).create_namespaced_job(ns, job("needs-secret", script, env=env))

    def waiting_reason() -> str | None:
        pods = core.list_namespaced_pod(ns).items
        statuses = pods[0].status.container_statuses if pods else None
        return statuses[0].state.waiting.reason if statuses and statuses[0].state.waiting else None

    assert wait_until(waiting_reason, 30, "the pod to wait for its Secret") == "CreateContainerConfigError"
    assert kubelet.runs == {}
    core.create_namespaced_secret(ns, {"metadata": {"name": "late"}, "stringData": {"k": "v"}})
    cond = wait_until(lambda: job_condition(k8s, ns, "needs-secret"), 60, "Job needs-secret to finish")
    assert cond["type"] == "Complete"
