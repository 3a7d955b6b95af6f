"""Issue 14 on the real API server (1.20: the per-task fallback shape), stage pods really run by the
stand-in kubelet against the real S3 store:

- the operator reports the shape it chose (status.jobShape, a JobShape event, fusionrun_job_shape_info);
- /metrics, scraped during the run, moves: runs by phase, Jobs created by stage, retries, passes, store
  requests; a pod whose process is SIGKILLed (exit 137) is retried and the run goes on;
- a store endpoint whose host does not resolve fails the run once (exit code 2 at the store check, no
  retry), with the stage's own message in the Failed condition.
"""

from __future__ import annotations

import socket
import time
import urllib.request

import pytest
from kubernetes import client

from tests.harness.fusionrun_k8s import (  # noqa: F401  (fixtures)
    RunEnv,
    condition,
    fusionrun_env_fixture,
    pod_task,
    task_selector,
)
from tests.harness.k8s import k8s_fixture, k8s_namespace_fixture, kubelet_fixture, wait_until  # noqa: F401

pytestmark = [pytest.mark.k8s, pytest.mark.s3]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    """The operator's /metrics as {series: value} (comments dropped)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def events_of(env: RunEnv, run: str) -> list[tuple[str, str]]:
    evs = client.CoreV1Api(env.k8s.api()).list_namespaced_event(env.ns).items
    return [(e.reason, e.message) for e in evs if e.involved_object.name == run]


def test_metrics_move_and_a_killed_pod_is_retried(fusionrun_env: RunEnv) -> None:
    env = fusionrun_env
    port = free_port()
    env.operator.stop()
    env.operator.env["FUSIONRUN_METRICS_PORT"] = str(port)
    env.operator.start()
    shape = 'fusionrun_job_shape_info{server_version="1.20",shape="PerTask"}'
    wait_until(lambda: shape in _metrics_or_none(port), 60, "/metrics with the shape chosen at start")
    before = scrape(port)
    assert before['fusionrun_runs{phase="Running"}'] == 0 and before[shape] == 1

    extracts = env.kubelet.hold(lambda pod: pod_task(pod).startswith("extract-"))
    env.apply("met", env.spec())
    # prepare's process runs (it loads two tokenizers and reads the corpus): kill it, as an OOM kill would
    killed = wait_until(lambda: env.kubelet.kill(task_selector("prepare")), 120, "prepare's process to run")
    assert killed and killed[0].startswith("met-prepare-1-")
    mid = wait_until(
        lambda: (m := scrape(port)).get('fusionrun_task_retries_total{stage="prepare"}') == 1 and m,
        60,
        "the retry to show in /metrics",
    )
    assert mid['fusionrun_runs{phase="Running"}'] == 1
    assert mid['fusionrun_jobs_created_total{stage="prepare"}'] == 1  # the retry waits for its backoff
    wait_until(lambda: len(extracts.held) == 2, 120, "prepare's retry to succeed and both extracts to start")

    prepare = env.task("met", "prepare")
    assert (prepare["state"], prepare["attempts"], prepare["failures"]) == ("Succeeded", 2, 1)
    first = next(
        r for r in env.kubelet.runs_matching(task_selector("prepare")) if r.name.startswith("met-prepare-1-")
    )
    assert first.exit_code == 137 and not first.injected
    after = scrape(port)
    assert after['fusionrun_jobs_created_total{stage="prepare"}'] == 2
    assert after['fusionrun_jobs_created_total{stage="extract"}'] == 2
    assert after['fusionrun_task_retries_total{stage="prepare"}'] == 1
    assert after.get('fusionrun_task_failures_total{stage="prepare"}', 0) == 0
    assert after['fusionrun_runs{phase="Running"}'] == 1
    assert (
        after["fusionrun_reconcile_duration_seconds_count"]
        > before["fusionrun_reconcile_duration_seconds_count"]
    )
    assert after['fusionrun_store_requests_total{operation="head"}'] > 0
    assert after['fusionrun_errors_total{kind="reconcile"}'] == 0

    # the shape it chose, in status and as an event
    st = env.status("met")
    assert st["jobShape"] == "PerTask"
    shape = [m for r, m in events_of(env, "met") if r == "JobShape"]
    assert len(shape) == 1 and shape[0].startswith("Jobs: PerTask (one Job per task and per training rank)")
    assert "Kubernetes v1.20 (version + dry-run probe): no optional Job features" in shape[0]
    assert st["stages"]["extract"]["shards"] == "0/2"

    # deleting the run takes it out of the gauge
    env.k8s.kubectl(
        "delete", "fusionrun", "met", "--wait=true", "--timeout=60s", namespace=env.ns, timeout=90
    )
    wait_until(lambda: scrape(port)['fusionrun_runs{phase="Running"}'] == 0, 30, "the run to leave the gauge")
    assert env.operator.errors() == []


def _metrics_or_none(port: int) -> dict[str, float]:
    try:
        return scrape(port)
    except OSError:  # not listening yet
        return {}


def test_an_unresolvable_store_endpoint_fails_the_run_once_with_its_message(fusionrun_env: RunEnv) -> None:
    env = fusionrun_env
    endpoint = "http://fusionrun-store.invalid:9000"
    spec = env.spec(store={"endpoint": endpoint})
    started = time.monotonic()
    env.apply("nostore", spec)
    st = env.wait_phase("nostore", "Failed", 180)  # the store check's 30 s grace, then the verdict
    failed = condition(st, "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "InvalidInput")
    # the stage's own last error line, from its termination message
    assert failed["message"] == (
        "prepare: attempt 1 exited with code 2 (bad input: retrying cannot help; see its log, "
        f"fix the spec or the inputs): prepare: S3 endpoint {endpoint}: its host name does not resolve "
        "(checked before any work, for 30 s); fix store.endpoint (scheme, host, port) or start the store "
        "(permanent error)"
    )
    prepare = env.task("nostore", "prepare")
    assert (prepare["state"], prepare["attempts"], prepare["failures"]) == ("Failed", 1, 1)
    time.sleep(3)  # a few more passes: nothing is retried
    assert env.outcomes("nostore") == {"nostore-prepare-1": "Failed"}
    assert len(env.kubelet.runs) == 1 and next(iter(env.kubelet.runs.values())).exit_code == 2
    assert time.monotonic() - started < 150
