"""Issue 15 on the real API server with the operator running (one namespace, one operator for the module):

- a FusionRun naming a Secret that does not opt in fails with a clear condition, starts no Job, and nothing
  reaches the endpoint it names (a local TCP listener records every byte); labelled, the same run goes on,
  and the listener does get the key (so the listener would have seen a leak);
- key material planted in Secrets (a trailing newline, a space inside) is in no log line, event or status;
- a missing Secret, a missing bucket and missing credentials are Warning events (once each) and conditions;
- the operator writes each log line once, and each run's problem once however many passes see it.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from jobs.spec import SECRET_OPT_IN_LABEL
from tests.harness.fusionrun_k8s import (
    OperatorProcess,
    condition,
    create_s3_secret,
    fusionrun_yaml,
    get_run,
    run_jobs,
)
from tests.harness.k8s import ControlPlane, k8s_fixture, wait_until  # noqa: F401  (fixture)
from tests.harness.s3 import ACCESS_KEY, ENDPOINT, SECRET_KEY, S3Server

pytestmark = [pytest.mark.k8s, pytest.mark.s3]

PLANTED = ("planted-db-value-1", "AKIAPLANTEDLEAK9", "plantedSecretLeak9", "PLANTEDSPACE")


class Listener:
    """A TCP server on 127.0.0.1 that records every byte it receives and answers HTTP 500."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.received = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1)
                try:
                    self.received += conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 500 Nope\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@dataclass
class Cluster:
    k8s: ControlPlane
    ns: str
    tmp: Path
    operator: OperatorProcess
    bucket: str

    def apply(self, name: str, spec: dict[str, Any]) -> None:
        path = self.tmp / f"{name}.yaml"
        path.write_text(fusionrun_yaml(name, spec))
        self.k8s.kubectl("apply", "-f", str(path), namespace=self.ns)

    def status(self, name: str) -> dict[str, Any]:
        return (get_run(self.k8s, self.ns, name) or {}).get("status") or {}

    def wait_condition(self, name: str, type_: str, status: str, reason: str, timeout: float = 60) -> dict:
        def seen() -> dict | None:
            c = condition(self.status(name), type_)
            return c if c and (c["status"], c.get("reason")) == (status, reason) else None

        return wait_until(seen, timeout, f"{name}: condition {type_}={status} ({reason})")

    def events(self, name: str) -> list[Any]:
        items = client.CoreV1Api(self.k8s.api()).list_namespaced_event(self.ns).items
        return [e for e in items if e.involved_object.name == name]

    def reasons(self, name: str) -> list[tuple[str, str]]:
        return sorted((e.type, e.reason) for e in self.events(name))

    def secret(self, name: str, data: dict[str, str], opt_in: bool) -> None:
        labels = {SECRET_OPT_IN_LABEL: "true"} if opt_in else {}
        client.CoreV1Api(self.k8s.api()).create_namespaced_secret(
            self.ns, {"metadata": {"name": name, "labels": labels}, "stringData": data}
        )


def spec(store: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "target": {
            "name": "tgt",
            "tokenizer": "/models/tok",
            "randomInit": {"hiddenSize": 16, "numHeads": 2},
        },
        "sources": [{"name": "src", "uri": "/models/src"}],
        "corpus": {"uri": "/data/corpus.txt"},
        "extraction": {"maxLength": 64},
        "training": {"seqLen": 64, "maxSteps": 1},
    }
    return out | ({"store": store} if store else {})


@pytest.fixture(scope="module")
def cluster(
    k8s: ControlPlane, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    k8s.apply_crds()
    ns = k8s.create_namespace("security")
    tmp = tmp_path_factory.mktemp("security")
    bucket = s3_server.make_bucket()
    op = OperatorProcess(
        k8s,
        ns,
        tmp / "operator.log",
        FUSIONRUN_DEFAULT_STORE_URI=f"s3://{bucket}/ops",
        FUSIONRUN_DEFAULT_STORE_ENDPOINT=ENDPOINT,
        FUSIONRUN_DEFAULT_STORE_INSECURE="true",
        # no identity of its own: what it reads, it reads with a run's opted-in keys
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
        AWS_CONFIG_FILE="/nonexistent",
        AWS_EC2_METADATA_DISABLED="true",
    )
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        op.env.pop(var, None)
    op.start()
    try:
        yield Cluster(k8s, ns, tmp, op, bucket)
        lines = op.log().splitlines()
        # one handler: what happens once is written once (two handlers wrote every line twice)
        for once in ("Activity 'configure' succeeded.", "Initial authentication has finished."):
            assert sum(once in ln for ln in lines) == 1, once
        ours = [ln for ln in lines if "fusionrun_operator" in ln]
        assert ours and len(ours) == len(set(ours)), "a line of the operator's written twice"
        assert op.alive() and not op.errors(), op.log()[-4000:]
    finally:
        op.stop()
        print(op.log()[-6000:])
        k8s.delete_namespace(ns)


def test_a_secret_that_does_not_opt_in_is_never_used(cluster: Cluster) -> None:
    listener = Listener()
    try:
        cluster.secret("db-password", {"password": "planted-db-value-1"}, opt_in=False)
        theft = {"name": "db-password", "accessKeyKey": "password", "secretKeyKey": "password"}
        store = {"uri": "s3://loot/runs", "endpoint": f"http://127.0.0.1:{listener.port}", "insecure": True}
        cluster.apply("steal", spec(store | {"credentialsSecret": theft}))
        cond = cluster.wait_condition("steal", "CredentialsReady", "False", "SecretNotOptedIn")
        assert f"lacks the label {SECRET_OPT_IN_LABEL}" in cond["message"]
        st = cluster.status("steal")
        assert st["phase"] == "Failed" and condition(st, "Failed")["reason"] == "SecretNotOptedIn"
        time.sleep(3)  # three more passes
        assert run_jobs(cluster.k8s, cluster.ns, "steal") == {}  # no pod got the Secret
        assert bytes(listener.received) == b""  # nothing was sent to the run's endpoint
        assert cluster.reasons("steal").count(("Warning", "SecretNotOptedIn")) == 1
        # The owner opts in: the run goes on, and the operator reads the store with those keys (the
        # listener sees them: it would have seen a leak).
        client.CoreV1Api(cluster.k8s.api()).patch_namespaced_secret(
            "db-password", cluster.ns, {"metadata": {"labels": {SECRET_OPT_IN_LABEL: "true"}}}
        )
        wait_until(
            lambda: run_jobs(cluster.k8s, cluster.ns, "steal"), 30, "the run's first Job once opted in"
        )
        wait_until(lambda: b"Credential=planted-db-value-1/" in listener.received, 30, "the store read")
        assert ("Normal", "CredentialsReady") in cluster.reasons("steal")
    finally:
        cluster.k8s.kubectl("delete", "fusionrun", "steal", "--wait=false", namespace=cluster.ns, check=False)
        listener.close()


def test_planted_key_material_is_in_no_log_event_or_status(cluster: Cluster) -> None:
    store = {"uri": f"s3://{cluster.bucket}/runs", "endpoint": ENDPOINT, "insecure": True}
    # `kubectl create secret --from-file` of an echoed file: a trailing newline; and a key with a space
    cluster.secret(
        "leaky",
        {"AWS_ACCESS_KEY_ID": "AKIAPLANTEDLEAK9\n", "AWS_SECRET_ACCESS_KEY": "plantedSecretLeak9"},
        True,
    )
    cluster.secret("spacey", {"AWS_ACCESS_KEY_ID": "AKIA PLANTEDSPACE", "AWS_SECRET_ACCESS_KEY": "x"}, True)
    cluster.apply("leak", spec(store | {"credentialsSecret": {"name": "leaky"}}))
    cluster.apply("spacey", spec(store | {"credentialsSecret": {"name": "spacey"}}))
    denied = cluster.wait_condition("leak", "StoreReadable", "False", "AccessDenied")
    assert "access denied (403)" in denied["message"]  # the stripped key reached the server, which refused it
    invalid = cluster.wait_condition("spacey", "CredentialsReady", "False", "InvalidCredentials")
    assert invalid["message"].endswith("contains whitespace or control characters; set it to the key alone")
    time.sleep(3)
    texts = {
        "operator log": cluster.operator.log(),
        "events": json.dumps(
            [
                (e.reason, e.message)
                for e in client.CoreV1Api(cluster.k8s.api()).list_namespaced_event(cluster.ns).items
            ]
        ),
        "runs": json.dumps([get_run(cluster.k8s, cluster.ns, n) for n in ("leak", "spacey", "steal")]),
    }
    for where, text in texts.items():
        for planted in PLANTED:
            assert planted not in text, f"{planted} in the {where}"


def test_missing_secret_bucket_and_credentials_are_events_and_conditions(cluster: Cluster) -> None:
    create_s3_secret(cluster.k8s, cluster.ns, ACCESS_KEY, SECRET_KEY)  # the right keys, opted in
    s3 = {"endpoint": ENDPOINT, "insecure": True}
    cluster.apply(
        "nosecret", spec({"uri": f"s3://{cluster.bucket}/runs", **s3, "credentialsSecret": {"name": "later"}})
    )
    cluster.apply(
        "nobucket",
        spec({"uri": "s3://no-such-bucket-15/runs", **s3, "credentialsSecret": {"name": "fusionrun-s3"}}),
    )
    cluster.apply("nocreds", spec(None))  # the operator's default store, with the operator's own (no) keys
    waiting = cluster.wait_condition("nosecret", "CredentialsReady", "False", "SecretNotFound")
    assert "does not exist" in waiting["message"]
    assert cluster.status("nosecret")["message"].startswith("waiting: Secret ")
    cluster.wait_condition("nobucket", "StoreReadable", "False", "BucketNotFound")
    cluster.wait_condition("nocreds", "StoreReadable", "False", "NoCredentials")
    time.sleep(4)  # several passes (resync every second) see the same problems
    assert run_jobs(cluster.k8s, cluster.ns, "nosecret") == {}
    for run, reason in (
        ("nosecret", "SecretNotFound"),
        ("nobucket", "BucketNotFound"),
        ("nocreds", "NoCredentials"),
    ):
        assert cluster.reasons(run).count(("Warning", reason)) == 1, cluster.reasons(run)
        logged = [ln for ln in cluster.operator.log().splitlines() if f"/{run}: {reason}" in ln]
        assert len(logged) == 1, logged  # once per run and problem, not once per pass
    # The Secret appears (opted in): the waiting run starts.
    create_s3_secret(cluster.k8s, cluster.ns, ACCESS_KEY, SECRET_KEY, name="later")
    wait_until(
        lambda: run_jobs(cluster.k8s, cluster.ns, "nosecret"), 30, "the run to start once its Secret exists"
    )
    cluster.wait_condition("nosecret", "StoreReadable", "True", "StoreRead")
