"""End to end on a real control plane: `kubectl apply -f` a tiny FusionRun, the operator (a subprocess)
creates one Job per task, the stand-in kubelet runs each pod's real `python -m jobs <stage>` against the
real SeaweedFS S3 store, the job controller completes the Jobs, and the run reaches Succeeded with the
trained model in the store. About 2 minutes on 2 cores (seven stage processes, each loading torch)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from kubernetes import client

from jobs.plan import build_dag
from jobs.spec import parse_spec
from tests.harness.fusionrun_k8s import (  # noqa: F401  (fixtures)
    RunEnv,
    StatusRecorder,
    condition,
    fusionrun_env_fixture,
    s3_keys,
)
from tests.harness.k8s import k8s_fixture, k8s_namespace_fixture, kubelet_fixture, wait_until  # noqa: F401

pytestmark = [pytest.mark.k8s, pytest.mark.s3]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STAGES = ["prepare", "extract", "align", "fuse", "train", "evaluate"]
STAGE_CONDITIONS = ["Prepared", "Extracted", "Aligned", "Fused", "Trained", "Evaluated"]


def test_tiny_run_goes_from_kubectl_apply_to_a_trained_model(fusionrun_env: RunEnv) -> None:
    env = fusionrun_env
    spec = env.spec()
    task_ids = [t.id for t in build_dag(parse_spec(spec))]
    assert task_ids == [
        "prepare",
        "extract-target-00000",
        "extract-qwen-00000",
        "align-qwen-00000",
        "fuse-00000",
        "train",
        "evaluate",
    ]

    with StatusRecorder(env.k8s, env.ns, "tiny") as rec:
        assert env.apply("tiny", spec) == "fusionrun.fusionrun.dev/tiny created"
        st = env.wait_phase("tiny", "Succeeded", 420)

    # Transitions: the run went Running -> Succeeded through every stage in order, each task once.
    assert rec.phases[-2:] == ["Running", "Succeeded"] and set(rec.phases) <= {
        "Pending",
        "Running",
        "Succeeded",
    }
    assert [s for s in rec.stages if s in STAGES] == STAGES[: len(rec.stages)] or rec.stages == STAGES
    assert rec.stages[:4] == STAGES[:4]
    for task_id in task_ids:
        assert rec.tasks[task_id][-1] == "Succeeded" and "Failed" not in rec.tasks[task_id]
        assert "Retrying" not in rec.tasks[task_id]
    for t in st["tasks"]:
        assert (t["state"], t["attempts"], t["failures"]) == ("Succeeded", 1, 0), t

    # Conditions: Succeeded, not Failed, and every stage's own condition.
    assert condition(st, "Succeeded")["status"] == "True"
    assert condition(st, "Failed")["status"] == "False"
    for type_ in STAGE_CONDITIONS:
        assert condition(st, type_)["status"] == "True", type_

    # Exactly one Job per task (attempt 1), all complete: nothing duplicated, nothing left running.
    # (A task is done once its outputs are in the store; its Job's Complete condition follows a moment later.)
    expected = {f"tiny-{t}-1": "Complete" for t in task_ids}
    wait_until(lambda: env.outcomes("tiny") == expected, 30, f"exactly the Jobs {expected}")
    assert sorted(r.exit_code for r in env.kubelet.runs.values()) == [0] * len(task_ids)

    # The trained model is in the store, in Hugging Face format, shaped as the spec says.
    model_keys = env.keys("runs/tiny/train/fused/model/")
    assert "runs/tiny/train/fused/model/config.json" in model_keys
    assert any(k.endswith(".safetensors") for k in model_keys), model_keys
    s3 = env.s3.client()
    config = json.loads(
        s3.get_object(Bucket=env.bucket, Key="runs/tiny/train/fused/model/config.json")["Body"].read()
    )
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (16, 1, 2)
    assert config["vocab_size"] >= 32000  # the target's tokenizer: Mistral v0.1, 32,000 tokens
    metrics_key = "runs/tiny/evaluate/metrics.json"
    metrics = json.loads(s3.get_object(Bucket=env.bucket, Key=metrics_key)["Body"].read())
    assert st["metrics"] and set(st["metrics"]) <= set(metrics) | {"models", "documents"}
    assert st["artifactsUri"].rstrip("/") == f"s3://{env.bucket}/runs/tiny"

    # What `kubectl get fusionruns` shows for it.
    rows = [r.split() for r in env.k8s.kubectl("get", "fusionruns", namespace=env.ns).stdout.splitlines()]
    assert rows[0] == ["NAME", "STAGE", "PROGRESS", "PHASE", "AGE"]
    assert rows[1][0] == "tiny" and rows[1][-2] == "Succeeded", rows
    assert env.operator.errors() == []


def test_two_node_training_rendezvous_through_the_headless_service(fusionrun_env: RunEnv) -> None:
    """training.nodes = 2: one Job per node rank behind a headless Service; rank 1 reaches rank 0 at its
    cluster DNS name (the stand-in kubelet maps `<pod>.<svc>.<ns>.svc` to 127.0.0.1), and DeepSpeed
    trains with world size 2 across the two pods."""
    env = fusionrun_env
    env.operator.stop()  # the rendezvous port must be free on this machine: pick one
    env.operator.env["FUSIONRUN_MASTER_PORT"] = str(free_port())
    env.operator.start()
    spec = env.spec(training={"nodes": 2, "zeroStage": 2}, evaluation={"enabled": False})
    env.apply("mn", spec)
    st = env.wait_phase("mn", "Succeeded", 420)

    train = next(t for t in st["tasks"] if t["id"] == "train")
    assert (train["state"], train["attempts"], train["failures"]) == ("Succeeded", 1, 0)
    expected = {"mn-train-1-r0": "Complete", "mn-train-1-r1": "Complete"}
    wait_until(
        lambda: {n: o for n, o in env.outcomes("mn").items() if "train" in n} == expected,
        30,
        f"exactly the training Jobs {expected}",
    )
    svc = client.CoreV1Api(env.k8s.api()).read_namespaced_service("mn-train", env.ns)
    assert svc.spec.cluster_ip == "None"  # headless: DNS names for the pods, no virtual IP
    ranks = sorted(
        (r for r in env.kubelet.runs.values() if r.labels.get("fusionrun.dev/task") == "train"),
        key=lambda r: r.env["NODE_RANK"],
    )
    assert [(r.env["NODE_RANK"], r.env["WORLD_SIZE"], r.env["MASTER_ADDR"], r.exit_code) for r in ranks] == [
        ("0", "2", "127.0.0.1", 0),
        ("1", "2", "127.0.0.1", 0),
    ]
    core = client.CoreV1Api(env.k8s.api())
    pods = core.list_namespaced_pod(env.ns, label_selector="fusionrun.dev/task=train")
    assert sorted((p.spec.hostname, p.spec.subdomain) for p in pods.items) == [
        ("mn-train-0", "mn-train"),
        ("mn-train-1", "mn-train"),
    ]
    assert '"world_size": 2' in env.kubelet.log_of(ranks[0].name)
    assert "runs/mn/train/fused/model/config.json" in env.keys("runs/mn/train/fused/model/")
    assert env.operator.errors() == []


def test_the_k8s_tiny_example_runs_on_the_stand_in_kubelet(fusionrun_env: RunEnv) -> None:
    """examples/k8s-tiny.yaml exactly as users apply it (the chart's default store, the tokenizers the job
    image carries as pkg://), on the fast loop: the same example README's "Try it on a cluster" runs on a
    real kubelet in tests/test_cluster.py. Prints apply -> Succeeded for docs/results.md."""
    env = fusionrun_env
    env.operator.stop()
    env.operator.env |= {
        "FUSIONRUN_DEFAULT_STORE_URI": "s3://fusionrun/runs",
        "FUSIONRUN_DEFAULT_STORE_ENDPOINT": env.s3.endpoint,
        "FUSIONRUN_DEFAULT_STORE_INSECURE": "true",
        "FUSIONRUN_DEFAULT_STORE_SECRET": "fusionrun-s3",
    }
    env.operator.start()
    root = Path(__file__).resolve().parents[1]
    env.s3.make_bucket("fusionrun")
    env.s3.client().upload_file(
        str(root / "examples" / "data" / "stdlib-docstrings.txt"),
        "fusionrun",
        "corpora/stdlib-docstrings.txt",
    )
    started = time.monotonic()
    out = env.k8s.kubectl("apply", "-f", str(root / "examples" / "k8s-tiny.yaml"), namespace=env.ns).stdout
    assert out.strip() == "fusionrun.fusionrun.dev/tiny created"
    st = env.wait_phase("tiny", "Succeeded", 900)
    print(f"stand-in kubelet: k8s-tiny apply -> Succeeded in {time.monotonic() - started:.0f} s")
    assert len(st["tasks"]) == 12
    assert all(t["state"] == "Succeeded" for t in st["tasks"]), st["tasks"]
    # Pods of the stand-in kubelet share this machine's network: the two trainings (FuseLLM, CLM-only) can
    # race for the rendezvous port, and the loser retries. On a real kubelet each pod has its own network
    # (tests/test_cluster.py: every task once).
    assert all(t["attempts"] == 1 for t in st["tasks"] if not t["id"].startswith("train")), st["tasks"]
    assert st["artifactsUri"].rstrip("/") == "s3://fusionrun/runs/tiny"
    assert "runs/tiny/train/fused/model/config.json" in s3_keys(
        env.s3.client(), "fusionrun", "runs/tiny/train/"
    )
