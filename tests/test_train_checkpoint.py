"""Checkpoint bookkeeping on real stores (file:// and the SeaweedFS S3 server): markers, choice, transfer,
pruning. The DeepSpeed side (save, kill, resume to identical weights) is in test_train_distributed.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fusion.train import checkpoint as ck
from jobs.settings import Settings
from jobs.spec import StoreSpec
from jobs.store import open_store
from tests.harness.s3 import ENDPOINT

PREFIX = "train/fused/checkpoints"


def make_checkpoint(root: Path, step: int, fingerprint: str | None = "fp", marker: bool = True) -> Path:
    d = root / ck.tag(step)
    (d / "sub").mkdir(parents=True, exist_ok=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"model" * (step + 1))
    (d / "sub" / "zero_pp_rank_0_optim_states.pt").write_bytes(b"optim" * step)
    if marker:
        ck.write_local_marker(d, ck.marker_bytes(step, ck.hash_files(d), {"fingerprint": fingerprint}))
    return d


def test_marker_lists_every_file_with_size_and_sha(tmp_path: Path):
    d = make_checkpoint(tmp_path, 3)
    m = json.loads((d / ck.MARKER).read_text())
    # sha256 of b"optim" * 3, from `printf optimoptimoptim | sha256sum`
    assert m["step"] == 3 and m["fingerprint"] == "fp"
    assert m["files"]["mp_rank_00_model_states.pt"]["bytes"] == 20
    assert m["files"]["sub/zero_pp_rank_0_optim_states.pt"] == {
        "bytes": 15,
        "sha256": "a4341d60cd370d69c5b411540103c3379aef51455f2378cafab01827eb18150b",
    }


def test_folders_without_marker_truncated_files_or_other_fingerprints_are_not_complete(tmp_path: Path):
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 4)
    make_checkpoint(tmp_path, 6, marker=False)  # a save cut short
    make_checkpoint(tmp_path, 8, fingerprint="another-config")
    truncated = make_checkpoint(tmp_path, 10)
    (truncated / "mp_rank_00_model_states.pt").write_bytes(b"x")
    assert ck.local_steps(tmp_path, "fp") == [2, 4]
    assert ck.local_steps(tmp_path) == [2, 4, 8]  # no fingerprint asked: any configuration


def test_checkpoints_of_another_configuration_are_dropped(tmp_path: Path):
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 500, fingerprint="old-config")
    make_checkpoint(tmp_path, 7, marker=False)  # maybe ours, cut short: not for this function to judge
    assert ck.drop_foreign_local(tmp_path, "fp") == [500]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2", "step-7"]
    store = open_store(StoreSpec(uri=f"file://{tmp_path / 'store'}"), "run", Settings())
    for s, fp in ((2, "fp"), (500, "old-config")):
        d = make_checkpoint(tmp_path / "src", s, fingerprint=fp)
        ck.upload(store, PREFIX, d, ck.hash_files(d))
        store.put_bytes(f"{PREFIX}/{ck.tag(s)}/{ck.MARKER}", (d / ck.MARKER).read_bytes())
    assert ck.drop_foreign_store(store, PREFIX, "fp") == [500]
    assert ck.store_steps(store, PREFIX) == [2] and not store.list(f"{PREFIX}/step-500/")


def test_choose_resume_takes_the_newest_and_prefers_local_on_a_tie():
    assert ck.choose_resume([], []) is None
    assert ck.choose_resume([2, 4], [2, 4, 6]) == (6, "store")
    assert ck.choose_resume([2, 8], [2, 4, 6]) == (8, "local")
    assert ck.choose_resume([6], [6]) == (6, "local")


def test_prune_local_keeps_the_newest_complete_and_clears_old_partials(tmp_path: Path):
    for s in (2, 4, 6):
        make_checkpoint(tmp_path, s)
    make_checkpoint(tmp_path, 3, marker=False)  # an old crash leftover
    make_checkpoint(tmp_path, 8, marker=False)  # newer than any complete one: left alone
    assert ck.prune_local(tmp_path, keep=2) == [2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-4", "step-6", "step-8"]


def roundtrip(store, tmp_path: Path) -> None:
    src = tmp_path / "node-a"
    for s in (2, 4, 6):
        d = make_checkpoint(src, s)
        files = ck.hash_files(d)
        ck.upload(store, PREFIX, d, files)
        if s != 6:  # step 6's marker never reaches the store: the upload was cut short
            store.put_bytes(f"{PREFIX}/{ck.tag(s)}/{ck.MARKER}", (d / ck.MARKER).read_bytes())
    assert ck.store_steps(store, PREFIX, "fp") == [2, 4]
    assert ck.store_steps(store, PREFIX, "other") == []

    # a new node (empty disk) resumes from the store: files and marker arrive, checked
    dst = tmp_path / "node-b"
    got = ck.download(store, PREFIX, 4, dst)
    assert ck.local_complete(got, "fp")
    assert (got / "sub" / "zero_pp_rank_0_optim_states.pt").read_bytes() == b"optim" * 4

    # a corrupt object in the store is refused, naming it, and leaves no marker behind
    store.put_bytes(f"{PREFIX}/step-2/mp_rank_00_model_states.pt", b"modelmodelmodeX")
    with pytest.raises(ck.CheckpointError, match=r"step-2/mp_rank_00_model_states.pt: checksum mismatch"):
        ck.download(store, PREFIX, 2, tmp_path / "node-c")
    assert not (tmp_path / "node-c" / "step-2" / ck.MARKER).exists()

    # keep 1: step 2 goes; step 6 (no marker) is newer than the kept step 4, so it may still be uploading
    assert ck.prune_store(store, PREFIX, keep=1) == [2]
    assert ck.store_steps(store, PREFIX) == [4]
    assert not [k for k in store.list(f"{PREFIX}/") if "/step-2/" in k]
    d = make_checkpoint(src, 8)
    ck.upload(store, PREFIX, d, ck.hash_files(d))
    store.put_bytes(f"{PREFIX}/step-8/{ck.MARKER}", (d / ck.MARKER).read_bytes())
    assert ck.prune_store(store, PREFIX, keep=1) == [4, 6]  # the cut-short step 6 is garbage now
    assert {k.split("/")[3] for k in store.list(f"{PREFIX}/")} == {"step-8"}


def test_upload_download_prune_on_a_file_store(tmp_path: Path):
    roundtrip(open_store(StoreSpec(uri=f"file://{tmp_path / 'store'}"), "run", Settings()), tmp_path)


@pytest.mark.s3
def test_upload_download_prune_on_s3(s3_server, s3_bucket, tmp_path: Path):
    spec = StoreSpec(uri=f"s3://{s3_bucket}/runs", endpoint=ENDPOINT, insecure=True)
    roundtrip(open_store(spec, "run", Settings(), check=True), tmp_path)
