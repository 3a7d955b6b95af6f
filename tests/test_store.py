"""The artifact store on a local folder and on a real S3 server (SeaweedFS), and task manifests."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

from jobs.complete import (
    Output,
    Policy,
    build_manifest,
    completed_tasks,
    digest,
    manifest_key,
    read_manifest,
    why_incomplete,
    write_manifest,
)
from jobs.plan import Stage, Task, build_dag
from jobs.settings import Settings
from jobs.spec import StoreSpec, parse_spec
from jobs.store import LocalStore, S3Store, StoreError, download_model, open_store
from tests.harness.s3 import ENDPOINT

SPEC = {
    "target": {"name": "tgt", "tokenizer": "/tok", "randomInit": {}},
    "sources": [{"name": "src", "tokenizer": "/tok2", "randomInit": {}}],
    "corpus": {"uri": "/corpus.txt"},
    "extraction": {"maxLength": 256},
    "training": {"seqLen": 128},
}


def _train_complete(tmp_path: Path) -> tuple[LocalStore, Task]:
    """A store where every task of SPEC up to FuseLLM's training is complete (placeholder outputs)."""
    spec = parse_spec(SPEC)
    dag = build_dag(spec)
    store = open_store(StoreSpec(uri=str(tmp_path)), "r", Settings())
    for task in dag:
        if task.stage is not Stage.evaluate:
            _complete(store, spec, task, dag, {f"{task.id}.out": task.id.encode()})
    return store, next(t for t in dag if t.id == "train")


def test_turning_a_baseline_on_or_off_does_not_retrain_the_others(tmp_path: Path) -> None:
    store, train = _train_complete(tmp_path)
    for flags in ({"clmBaseline": True}, {"selfDistillBaseline": True}, {"sourcesOnlyBaseline": True}):
        spec = parse_spec({**SPEC, "training": {"seqLen": 128, **flags}})
        by_id = {t.id: t for t in build_dag(spec)}
        assert why_incomplete(store, spec, train, by_id) is None, flags
    with_clm = parse_spec({**SPEC, "training": {"seqLen": 128, "clmBaseline": True}})
    by_id = {t.id: t for t in build_dag(with_clm)}
    assert why_incomplete(store, with_clm, by_id["train-clm"], by_id) == "no manifest"
    # What the model trains with still counts.
    lr = parse_spec({**SPEC, "training": {"seqLen": 128, "learningRate": 0.1}})
    assert why_incomplete(store, lr, train, {t.id: t for t in build_dag(lr)}) == "spec changed"


def test_a_training_record_of_the_fingerprint_that_counted_clm_baseline_stays_valid(tmp_path: Path) -> None:
    """Manifests written while training.clmBaseline was in every variant's fingerprint (the fields below,
    as that code computed them) are complete whichever value the flag has now."""
    store, train = _train_complete(tmp_path)
    old_spec = parse_spec({**SPEC, "training": {"seqLen": 128, "clmBaseline": False}})
    dumped = old_spec.model_dump(mode="json", by_alias=True)["training"]
    skip = (
        "checkpointInterval",
        "selfDistillBaseline",
        "sourcesOnlyBaseline",
        "lambdaFinal",
    )  # lambdaFinal: later
    fields = {"training": {k: v for k, v in dumped.items() if k not in skip}}
    m = read_manifest(store, train)
    record = {"fields": fields, "task": "train", "version": m["version"]}
    text = json.dumps(record, sort_keys=True, separators=(",", ":"))
    m["fingerprint"] = hashlib.sha256(text.encode()).hexdigest()
    write_manifest(store, train, m)
    for clm in (False, True):
        spec = parse_spec({**SPEC, "training": {"seqLen": 128, "clmBaseline": clm}})
        assert why_incomplete(store, spec, train, {t.id: t for t in build_dag(spec)}) is None
    lr = parse_spec({**SPEC, "training": {"seqLen": 128, "learningRate": 0.1}})
    assert why_incomplete(store, lr, train, {t.id: t for t in build_dag(lr)}) == "spec changed"


def _s3_spec(bucket: str, prefix: str = "runs") -> StoreSpec:
    return StoreSpec(uri=f"s3://{bucket}/{prefix}", endpoint=ENDPOINT, insecure=True)


def _exercise(store) -> None:
    """The same contract on every backend."""
    assert not store.exists("a/b.bin") and store.size("a/b.bin") is None
    store.put_bytes("a/b.bin", b"hello")
    assert store.exists("a/b.bin") and store.size("a/b.bin") == 5
    assert store.get_bytes("a/b.bin") == b"hello"
    store.put_bytes("a/b.bin", b"hello, again")  # overwrite
    assert store.get_bytes("a/b.bin") == b"hello, again"
    store.put_bytes("a/c.bin", b"x")
    store.put_bytes("ab/d.bin", b"y")
    assert store.list("a/") == ["a/b.bin", "a/c.bin"]
    assert store.list("") == ["a/b.bin", "a/c.bin", "ab/d.bin"]
    assert store.uri_for("a/b.bin").endswith("/run1/a/b.bin")
    with pytest.raises(StoreError, match="no such object"):
        store.get_bytes("nope")
    with pytest.raises(StoreError, match="invalid store key"):
        store.exists("../escape")
    assert store.delete_prefix("a/") == 2
    assert store.list("") == ["ab/d.bin"]
    store.delete("ab/d.bin")
    assert store.list("") == []


def test_local_store_contract(tmp_path: Path) -> None:
    store = open_store(StoreSpec(uri=f"file://{tmp_path}"), "run1", Settings())
    assert isinstance(store, LocalStore) and store.root == tmp_path / "run1"
    _exercise(store)


def test_local_store_upload_download_atomic(tmp_path: Path) -> None:
    store = open_store(StoreSpec(uri=str(tmp_path / "s")), "run1", Settings())
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(1000))
    store.upload(src, "x/f.bin")
    got = store.download("x/f.bin", tmp_path / "out" / "f.bin")
    assert got.read_bytes() == src.read_bytes()
    # No temporary files remain beside the objects.
    assert sorted(p.name for p in (tmp_path / "s" / "run1" / "x").iterdir()) == ["f.bin"]


def test_local_store_relative_uri_is_rejected() -> None:
    with pytest.raises(StoreError, match="relative"):
        open_store(StoreSpec(uri="./runs"), "r", Settings())


@pytest.mark.s3
def test_s3_store_contract(s3_server, s3_bucket) -> None:
    store = open_store(_s3_spec(s3_bucket), "run1", Settings(), check=True)
    assert isinstance(store, S3Store) and store.base_uri == f"s3://{s3_bucket}/runs/run1"
    _exercise(store)


@pytest.mark.s3
def test_s3_multipart_upload_and_download(s3_server, s3_bucket, tmp_path: Path) -> None:
    from boto3.s3.transfer import TransferConfig

    store = open_store(_s3_spec(s3_bucket), "run1", Settings())
    store.transfer = TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
    data = os.urandom(12 << 20)  # 3 parts
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    store.upload(src, "big.bin")
    head = s3_server.client().head_object(Bucket=s3_bucket, Key="runs/run1/big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # a multipart object's ETag counts its parts
    out = store.download("big.bin", tmp_path / "dl" / "big.bin")
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()


@pytest.mark.s3
def test_s3_errors_name_endpoint_bucket_and_fix(s3_server) -> None:
    env = {**os.environ, "FUSIONRUN_S3_MAX_ATTEMPTS": "2"}  # the settings an entry point reads
    with pytest.raises(StoreError, match=r"bucket 'no-such-bucket'.*does not exist; create it"):
        open_store(_s3_spec("no-such-bucket"), "r", Settings.from_env(env), check=True)
    bucket = s3_server.make_bucket()
    wrong = Settings.from_env({**env, "AWS_SECRET_ACCESS_KEY": "wrong-secret"})
    with pytest.raises(StoreError, match="access denied") as err:
        open_store(_s3_spec(bucket), "r", wrong, check=True)
    assert "wrong-secret" not in str(err.value) and "wrong-secret" not in repr(wrong)
    quick = Settings.from_env({**env, "FUSIONRUN_S3_CONNECT_TIMEOUT": "1"})
    spec = StoreSpec(uri=f"s3://{bucket}/p", endpoint="http://127.0.0.1:9", insecure=True)
    with pytest.raises(StoreError, match=r"cannot reach S3 endpoint http://127.0.0.1:9.*store.endpoint"):
        open_store(spec, "r", quick).put_bytes("k", b"v")


@pytest.mark.s3
def test_s3_rides_out_a_server_restart(s3_server, s3_bucket, tmp_path: Path) -> None:
    """The server goes away and comes back while the store keeps writing: bounded retries ride it out."""
    s3_server.require_owned()
    store = open_store(_s3_spec(s3_bucket), "run1", Settings())
    store.put_bytes("before", b"1")
    s3_server.stop()
    restarter = threading.Timer(2.0, s3_server.start)
    restarter.start()
    t0 = time.monotonic()
    try:
        src = tmp_path / "f.bin"
        src.write_bytes(b"z" * 100_000)
        store.upload(src, "during.bin")  # first attempts fail (connection refused), later ones succeed
    finally:
        restarter.join()
    assert time.monotonic() - t0 >= 1.5
    assert store.get_bytes("before") == b"1"
    assert store.get_bytes("during.bin") == b"z" * 100_000


@pytest.mark.s3
def test_download_model_caches_an_s3_folder(s3_server, s3_bucket, tmp_path) -> None:
    c = s3_server.client()
    c.put_object(Bucket=s3_bucket, Key="models/m1/config.json", Body=b"{}")
    c.put_object(Bucket=s3_bucket, Key="models/m1/sub/w.bin", Body=b"w")
    store = open_store(_s3_spec(s3_bucket), "run1", Settings(cache_dir=tmp_path / "cache"))
    path = Path(download_model(store, f"s3://{s3_bucket}/models/m1"))
    assert path.is_relative_to(tmp_path / "cache" / "models")  # the settings' cache, carried by the store
    assert (path / "config.json").read_bytes() == b"{}" and (path / "sub" / "w.bin").read_bytes() == b"w"
    c.delete_object(Bucket=s3_bucket, Key="models/m1/config.json")
    assert download_model(store, f"s3://{s3_bucket}/models/m1") == str(path)  # cached: no second download
    assert download_model(store, "/local/model") == "/local/model"
    with pytest.raises(StoreError, match="no objects under that prefix"):
        download_model(store, f"s3://{s3_bucket}/models/none")


# --------------------------------------------------------------------------------------------------
# Manifests


def _complete(store, spec, task: Task, dag, outputs: dict[str, bytes]) -> dict:
    from jobs.complete import input_digests

    outs = {}
    for k, data in outputs.items():
        store.put_bytes(k, data)
        outs[k] = Output(hashlib.sha256(data).hexdigest(), len(data))
    inputs = input_digests(store, {t.id: t for t in dag}, task)
    m = build_manifest(spec, task, outputs=outs, inputs=inputs, started_at=time.time())
    write_manifest(store, task, m)
    return m


def test_manifest_completeness_rules(tmp_path: Path) -> None:
    spec = parse_spec(SPEC)
    dag = build_dag(spec)
    by_id = {t.id: t for t in dag}
    store = open_store(StoreSpec(uri=str(tmp_path)), "r", Settings())
    prep, ext = by_id["prepare"], by_id["extract-tgt-00000"]
    assert manifest_key(ext) == "extract/tgt/shard-00000.manifest.json"
    assert why_incomplete(store, spec, prep, by_id) == "no manifest"
    m_prep = _complete(store, spec, prep, dag, {"prepare/shard-00000.safetensors": b"docs"})
    _complete(store, spec, ext, dag, {"extract/tgt/shard-00000.safetensors": b"logits"})
    assert completed_tasks(store, spec, dag) == {"prepare", "extract-tgt-00000"}

    # A truncated output (size differs) makes the task incomplete; verify catches same-size corruption.
    store.put_bytes("extract/tgt/shard-00000.safetensors", b"LOGITS")
    assert why_incomplete(store, spec, ext, by_id) is None
    assert (
        why_incomplete(store, spec, ext, by_id, Policy(verify=True))
        == "output extract/tgt/shard-00000.safetensors checksum mismatch"
    )
    store.put_bytes("extract/tgt/shard-00000.safetensors", b"logit")
    assert "has 5 bytes, manifest says 6" in why_incomplete(store, spec, ext, by_id)
    store.put_bytes("extract/tgt/shard-00000.safetensors", b"logits")

    # Redoing the upstream with identical outputs keeps dependants valid (timestamps are not content) ...
    time.sleep(0.01)
    m2 = _complete(store, spec, prep, dag, {"prepare/shard-00000.safetensors": b"docs"})
    assert m2["finished_at"] != m_prep["finished_at"] and digest(m2) == digest(m_prep)
    assert why_incomplete(store, spec, ext, by_id) is None
    # ... while changed upstream outputs invalidate them.
    _complete(store, spec, prep, dag, {"prepare/shard-00000.safetensors": b"other docs"})
    assert why_incomplete(store, spec, ext, by_id) == "an input changed"

    # A spec field that decides extraction invalidates; one that does not (training) leaves it alone.
    _complete(store, spec, ext, dag, {"extract/tgt/shard-00000.safetensors": b"logits"})
    topk = parse_spec({**SPEC, "extraction": {"maxLength": 256, "topK": 5}})
    assert why_incomplete(store, topk, ext, by_id) == "spec changed"
    lr = parse_spec({**SPEC, "training": {"seqLen": 128, "learningRate": 0.1}})
    assert why_incomplete(store, lr, ext, by_id) is None
    # Editing another model does not redo this model's extraction.
    src3 = {"name": "src", "tokenizer": "/tok2", "randomInit": {"seed": 3}}
    other = parse_spec({**SPEC, "sources": [src3]})
    assert why_incomplete(store, other, ext, by_id) is None
    src_ext = Task(Stage.extract, "src", 0, deps=("prepare",))
    assert why_incomplete(store, other, src_ext, by_id) == "no manifest"


@pytest.mark.s3
def test_the_test_s3_server_serves_more_buckets_than_the_disk_would_size_it_for(s3_server) -> None:
    """Every bucket takes a volume of its own. With the volume count left to SeaweedFS (free disk / 1 GiB) a
    machine with 21 GiB free ran out after ~19 buckets and CI failed with InternalError; the harness fixes the
    count and size, so 40 buckets at once (twice that) each take a write."""
    c = s3_server.client()
    buckets = [s3_server.make_bucket() for _ in range(40)]
    try:
        for b in buckets:
            c.put_object(Bucket=b, Key="k", Body=b"v")
        assert [c.get_object(Bucket=b, Key="k")["Body"].read() for b in buckets] == [b"v"] * 40
    finally:
        for b in buckets:
            s3_server.remove_bucket(b)
    assert not {b["Name"] for b in c.list_buckets()["Buckets"]} & set(buckets)
