"""Issue 14, in process: bounded store reads (the memo: an idle pass reads nothing, a Job that changes
re-reads its task, restartFrom forgets), the Prometheus metrics, the new settings, and the exit-code
taxonomy's pieces (an unreachable store endpoint at the check is permanent; the stage's last error line
reaches the termination log)."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from fusionrun_operator.capabilities import from_server
from fusionrun_operator.config import ConfigError, OperatorConfig, from_env
from fusionrun_operator.metrics import Metrics, task_outcomes
from fusionrun_operator.observations import JobObservation
from fusionrun_operator.pipeline import Pipeline, parse_pipeline
from fusionrun_operator.store_view import RunMemo, job_signatures, read_store_view
from prometheus_client import generate_latest

from jobs.complete import build_manifest, input_digests, invalidate, write_manifest
from jobs.retry import write_termination_message
from jobs.settings import S3Settings, Settings
from jobs.spec import StoreSpec
from jobs.status import FusionRunStatus, TaskStatus
from jobs.store import S3Store, StoreError, open_store
from tests.harness.kubelet import termination_message

CONFIG = OperatorConfig(job_image="img:1")


def pipeline(tmp_path: Path, shards: int = 50) -> Pipeline:
    doc = {
        "target": {"name": "target", "tokenizer": "pkg://mistral_common/data", "randomInit": {}},
        "sources": [{"name": "smol", "uri": "pkg://a"}, {"name": "qwen", "uri": "pkg://b"}],
        "corpus": {"uri": "s3://corpus/docs/"},
        "store": {"uri": f"file://{tmp_path}"},
        "extraction": {"shards": shards, "maxLength": 256},
        "training": {"seqLen": 256},
    }
    p = parse_pipeline(doc, CONFIG)
    assert isinstance(p, Pipeline)
    return p


def complete(p: Pipeline, task_ids: list[str]) -> None:
    store = open_store(p.spec.store, "demo", Settings())
    for t in p.tasks:
        if t.id in task_ids:
            write_manifest(
                store,
                t,
                build_manifest(
                    p.spec, t, outputs={}, inputs=input_digests(store, p.by_id, t), started_at=0.0
                ),
            )


def active(task_ids: list[str], attempt: int = 1, state: str = "Active") -> list[JobObservation]:
    return [JobObservation(f"demo-{t}-{attempt}", t, attempt, None, state, 1) for t in task_ids]  # type: ignore[arg-type]


def test_an_idle_pass_reads_nothing_and_a_finished_job_reads_its_task_again(tmp_path: Path) -> None:
    p = pipeline(tmp_path)  # 1 + 150 extract + 100 align + 50 fuse + train + evaluate
    extract = [t.id for t in p.tasks if t.stage.value == "extract"]
    complete(p, ["prepare", *extract[:10]])
    jobs = active(extract[10:])
    requests: Counter[str] = Counter()

    def view(memo: RunMemo | None, js: list[JobObservation]) -> Any:
        requests.clear()
        return read_store_view(
            p, "demo", memo=memo, signatures=job_signatures(js), count=lambda op: requests.update([op])
        )

    plain = view(None, jobs)
    # prepare: its manifest (head + get); 150 extracts: a head each, and for the 10 complete ones a get
    # (prepare's manifest for their input digest comes from the pass's cache); align, fuse and train wait
    # for inputs not complete, so they are not read; the train task's progress file: a head
    full_pass = Counter({"head": 1 + 150 + 1, "get": 1 + 10})
    assert requests == full_pass
    memo = RunMemo().for_spec("s1")
    first = view(memo, jobs)
    assert first.completed == plain.completed == frozenset({"prepare", *extract[:10]})
    assert requests == full_pass  # the first pass reads what the plain one does
    idle = view(memo, jobs)
    assert idle.completed == first.completed and requests == Counter()  # nothing changed: nothing read
    assert view(None, jobs) and requests == full_pass  # unmemoized: every pass costs O(tasks)
    # one extract Job finishes and its task wrote its manifest: that task and its input are read again
    complete(p, [extract[10]])
    finished = active(extract[10:11], state="Succeeded") + jobs[1:]
    after = view(memo, finished)
    assert after.completed == first.completed | {extract[10]}
    assert requests == Counter({"head": 2, "get": 2})  # prepare and extract[10], not 150 tasks
    view(memo, finished)
    assert requests == Counter()
    # restartFrom: the manifests go and the memo forgets them: read again, incomplete
    store = open_store(p.spec.store, "demo", Settings())
    invalidate(store, p.by_id[extract[0]])
    memo.forget([extract[0]])
    assert extract[0] not in view(memo, finished).completed
    # a new spec digest forgets everything
    assert RunMemo().for_spec("a").for_spec("b").verdicts == {}


def test_the_memo_says_what_a_full_read_says_as_jobs_come_and_go(tmp_path: Path) -> None:
    p = pipeline(tmp_path, shards=3)
    ids = [t.id for t in p.tasks]
    memo = RunMemo().for_spec("s")
    history: list[list[JobObservation]] = []
    for step in range(1, len(ids)):
        complete(p, ids[:step])
        jobs = active(ids[step : step + 3]) + active(ids[:step], state="Succeeded")
        history.append(jobs)
        sigs = job_signatures(jobs)
        full = read_store_view(p, "demo", signatures=sigs)
        memoized = read_store_view(p, "demo", memo=memo, signatures=sigs)
        assert memoized.completed == full.completed == frozenset(ids[:step]), step


def test_training_progress_is_read_while_its_job_runs_and_once_after(tmp_path: Path) -> None:
    p = pipeline(tmp_path, shards=1)
    store = open_store(p.spec.store, "demo", Settings())
    store.put_bytes("train/fused/progress.json", json.dumps({"step": 3, "total_steps": 9}).encode())
    memo, n = RunMemo().for_spec("s"), Counter()
    running, ended = active(["train"]), active(["train"], state="Succeeded")
    passes = [running, running, ended, ended]
    reads = []
    for jobs in passes:
        n.clear()
        v = read_store_view(
            p, "demo", memo=memo, signatures=job_signatures(jobs), count=lambda op: n.update([op])
        )
        assert v.progress == {"fused": {"step": 3, "total_steps": 9}}
        reads.append(sum(n.values()))
    # head + get of progress.json while it runs (the first pass also finds prepare's manifest missing:
    # a head, and looks prepare, ready without a Job, up in the shared cache: a get of the corpus
    # identity record, which no Job recorded yet, so no key; that miss is remembered), once more after it
    # ended, then nothing
    assert reads == [4, 2, 2, 0]


# --------------------------------------------------------------------------------------------------
# metrics


def scrape(metrics: Metrics) -> dict[str, float]:
    out = {}
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_count_what_passes_did() -> None:
    mt = Metrics()
    mt.set_shape(from_server((1, 30), None))
    mt.run_phase(("ns", "a"), "Running")
    mt.run_phase(("ns", "b"), "Running")
    mt.run_phase(("ns", "a"), "Succeeded")
    mt.jobs(["extract", "extract", "prepare"], ["extract"])
    mt.store_request("head")
    old = FusionRunStatus(
        tasks=[TaskStatus(id="fuse-00000", stage="fuse"), TaskStatus(id="prepare", stage="prepare")]
    )
    new = FusionRunStatus(
        tasks=[
            TaskStatus(id="fuse-00000", stage="fuse", state="Retrying", failures=1),
            TaskStatus(id="prepare", stage="prepare", state="Failed", failures=1),
        ]
    )
    mt.tasks(old, new)
    mt.tasks(new, new)  # the same status again: nothing new
    got = scrape(mt)
    assert got['fusionrun_runs{phase="Running"}'] == 1 and got['fusionrun_runs{phase="Succeeded"}'] == 1
    assert got['fusionrun_runs{phase="Failed"}'] == 0
    assert got['fusionrun_jobs_created_total{stage="extract"}'] == 2
    assert got['fusionrun_jobs_created_total{stage="prepare"}'] == 1
    assert got['fusionrun_jobs_deleted_total{stage="extract"}'] == 1
    assert got['fusionrun_task_retries_total{stage="fuse"}'] == 1
    assert got['fusionrun_task_failures_total{stage="prepare"}'] == 1
    assert got['fusionrun_store_requests_total{operation="head"}'] == 1
    assert got['fusionrun_errors_total{kind="reconcile"}'] == 0
    assert got['fusionrun_job_shape_info{server_version="1.30",shape="Indexed"}'] == 1
    mt.run_phase(("ns", "b"), None)
    assert scrape(mt)['fusionrun_runs{phase="Running"}'] == 0
    assert task_outcomes(new, new) == (Counter(), Counter())


def test_new_settings() -> None:
    cfg = from_env({})
    assert (cfg.job_shape, cfg.store_memo, cfg.metrics_port) == ("auto", True, 8081)
    cfg = from_env(
        {"FUSIONRUN_JOB_SHAPE": "per-task", "FUSIONRUN_STORE_MEMO": "false", "FUSIONRUN_METRICS_PORT": ""}
    )
    assert (cfg.job_shape, cfg.store_memo, cfg.metrics_port) == ("per-task", False, None)
    with pytest.raises(ConfigError, match="FUSIONRUN_JOB_SHAPE='sideways': use auto, indexed, per-task"):
        from_env({"FUSIONRUN_JOB_SHAPE": "sideways"})
    with pytest.raises(ConfigError, match="FUSIONRUN_METRICS_PORT='http'"):
        from_env({"FUSIONRUN_METRICS_PORT": "http"})


# --------------------------------------------------------------------------------------------------
# exit codes


@pytest.mark.parametrize(
    ("endpoint", "why"),
    [
        ("http://no-such-host.invalid:8333", "its host name does not resolve"),
        ("http://127.0.0.1:9", "nothing listens there (connection refused)"),
    ],
)
def test_an_unreachable_store_endpoint_is_permanent_at_the_check(endpoint, why) -> None:
    from jobs.stages.common import exit_code_for

    settings = Settings(s3=S3Settings(max_attempts=2, check_seconds=1, keys=("k", "s")))
    spec = StoreSpec(uri="s3://bucket/runs", endpoint=endpoint, insecure=True)
    started = time.monotonic()
    with pytest.raises(StoreError) as err:
        open_store(spec, "demo", settings, check=True)
    assert time.monotonic() - started >= 1  # tried again for the grace period first
    assert err.value.permanent and exit_code_for(err.value) == 2
    assert str(err.value) == (
        f"S3 endpoint {endpoint}: {why} (checked before any work, for 1 s); fix store.endpoint "
        "(scheme, host, port) or start the store"
    )
    # the same endpoint later in a task (a store restarting mid-run) is retried
    store = open_store(spec, "demo", settings)
    assert isinstance(store, S3Store)
    with pytest.raises(StoreError) as later:
        store.get_bytes("prepare/manifest.json")
    assert not later.value.permanent and exit_code_for(later.value) == 1


def test_a_store_that_comes_up_within_the_grace_period_passes_the_check(monkeypatch) -> None:
    """A store Service being created or restarting refuses connections for a moment: not a wrong spec."""
    import socket
    import threading

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")  # for the test's own client that makes the bucket
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    settings = Settings(s3=S3Settings(max_attempts=1, check_seconds=20, keys=("k", "s")))
    endpoint = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    # The bucket exists before the endpoint answers (moto's servers in one process share their state): the
    # store comes up whole, as a restarted one does, not bucket-less for a moment (a race, seen in CI).
    setup = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    setup.start()
    setup_endpoint = f"http://127.0.0.1:{setup.get_host_and_port()[1]}"
    boto3.client("s3", endpoint_url=setup_endpoint, region_name="us-east-1").create_bucket(Bucket="bucket")
    setup.stop()

    def come_up() -> None:
        time.sleep(0.5)
        server.start()

    riser = threading.Thread(target=come_up)
    riser.start()
    try:
        started = time.monotonic()
        spec = StoreSpec(uri="s3://bucket/runs", endpoint=endpoint, insecure=True)
        open_store(spec, "demo", settings, check=True)
        assert 0.5 < time.monotonic() - started < 20
    finally:
        riser.join()
        server.stop()


def test_the_stage_error_reaches_the_termination_log(tmp_path: Path, monkeypatch) -> None:
    from jobs.stages.common import InputError, run_guarded

    path = tmp_path / "termination-log"
    monkeypatch.setenv("FUSIONRUN_TERMINATION_LOG", str(path))

    def fails() -> int:
        raise InputError("x" * 5000)

    assert run_guarded("prepare", fails) == 2  # the entry point reads the variable, the stage's error lands
    assert path.read_bytes() == b"prepare: " + b"x" * (4096 - 9)
    monkeypatch.delenv("FUSIONRUN_TERMINATION_LOG")
    write_termination_message("nothing written", None)  # local runs: no file
    assert path.stat().st_size == 4096
    # what the stand-in kubelet reports, like a kubelet: the file, else the log's tail on a failure
    log = tmp_path / "pod.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    fallback = {"terminationMessagePolicy": "FallbackToLogsOnError"}
    empty = tmp_path / "empty"
    assert termination_message(fallback, path, 2, log).startswith("prepare: xxx")
    assert termination_message(fallback, empty, 1, log) == "\n".join(f"line {i}" for i in range(20, 100))
    assert termination_message(fallback, empty, 0, log) == ""
    assert termination_message({}, empty, 1, log) == ""
    assert os.environ.get("FUSIONRUN_TERMINATION_LOG") is None
