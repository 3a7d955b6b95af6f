"""fusion.format: shards round-trip, and every broken shard is refused with a message naming file and fix."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from fusion import format as fmt
from fusion.format import ShardError, id_dtype, read_shard, sha256_file, validate_arrays, write_shard


def _extract_arrays(n_docs: int = 3, k: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = np.array([5, 1, 7][:n_docs] + [3] * max(0, n_docs - 3))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(offsets[-1])
    return {
        "doc_index": np.arange(10, 10 + n_docs, dtype=np.int64),
        "doc_offsets": offsets,
        "input_ids": rng.integers(0, 60000, n).astype(np.uint16),
        "token_nbytes": rng.integers(0, 9, n).astype(np.uint16),
        "topk_ids": rng.integers(0, 60000, (n, k)).astype(np.uint16),
        "topk_logprobs": -np.sort(rng.random((n, k)) * 10, axis=1).astype(np.float16),
        "gold_logprob": -(rng.random(n) * 5).astype(np.float16),
        "doc_nll": (rng.random(n_docs) * 30).astype(np.float32),
        "doc_pred_nbytes": (lengths * 3).astype(np.int64),
        "doc_n_pred": (lengths - 1).astype(np.int32),
    }


def test_round_trip_with_checksum_counts_and_meta(tmp_path: Path) -> None:
    arrays = _extract_arrays()
    info = write_shard(
        tmp_path / "a" / "shard-00000.safetensors", "extract", arrays, meta={"model": "m", "k": 4}
    )
    assert info.sha256 == sha256_file(info.path) and info.nbytes == info.path.stat().st_size
    assert info.counts == {"documents": 3, "tokens": 13}
    shard = read_shard(info.path, "extract", info.sha256)
    assert shard.kind == "extract" and shard.meta == {"model": "m", "k": 4}
    assert sorted(shard.keys()) == sorted(arrays)
    for name, a in arrays.items():
        np.testing.assert_array_equal(shard[name], a)
        assert shard[name].dtype == a.dtype
    assert shard.n_docs == 3 and shard.n_tokens == 13
    assert shard.doc_slice(2) == slice(6, 13)
    np.testing.assert_array_equal(shard.rows("topk_ids", 4, 7), arrays["topk_ids"][4:7])
    assert shard.rows("gold_logprob", 12, 99).shape == (1,)  # clamped to the array
    assert shard.rows("topk_logprobs", 13, 20).shape == (0, 4)
    assert [p.name for p in info.path.parent.iterdir()] == ["shard-00000.safetensors"]  # no temp file left


def test_compact_layout_bytes_per_token(tmp_path: Path) -> None:
    # uint16 ids + fp16 values: a k=10 extract row costs 2 + 2 + 10 * (2 + 2) + 2 = 46 bytes, unpadded.
    arrays = _extract_arrays(n_docs=3, k=10)
    info = write_shard(tmp_path / "s.safetensors", "extract", arrays)
    payload = sum(a.nbytes for a in arrays.values())
    assert payload == 13 * 46 + 3 * (8 + 8 + 4 + 8 + 4) + 8
    header_len = struct.unpack("<Q", info.path.read_bytes()[:8])[0]
    assert info.nbytes == 8 + header_len + payload


def test_id_dtype_boundary() -> None:
    assert id_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert id_dtype(65537) == np.int32
    assert id_dtype(151_646) == np.int32


def test_missing_truncated_corrupt_and_checksum_mismatch(tmp_path: Path) -> None:
    info = write_shard(tmp_path / "s.safetensors", "extract", _extract_arrays())
    with pytest.raises(ShardError, match="missing; rerun the stage"):
        read_shard(tmp_path / "nope.safetensors", "extract")

    data = info.path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:-10])
    with pytest.raises(
        ShardError, match=r"truncated\.safetensors: not a readable shard .*delete it and rerun"
    ):
        read_shard(truncated, "extract")
    with pytest.raises(ShardError, match="checksum mismatch"):
        read_shard(truncated, "extract", info.sha256)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a shard at all" * 4)
    with pytest.raises(ShardError, match="not a readable shard"):
        read_shard(garbage)

    flipped = bytearray(data)
    flipped[-3] ^= 0xFF  # one bit of payload: the container is still valid, only the checksum catches it
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(
        ShardError, match=r"flipped\.safetensors: checksum mismatch \(corrupt or partial shard\)"
    ):
        read_shard(bad, "extract", info.sha256)
    assert read_shard(bad, "extract").kind == "extract"  # hence manifests carry the sha256


def test_wrong_kind_and_foreign_files(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    info = write_shard(tmp_path / "s.safetensors", "extract", _extract_arrays())
    with pytest.raises(ShardError, match="expected a fused shard, found extract"):
        read_shard(info.path, "fused")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": np.zeros(3, np.float32)}, str(foreign))
    with pytest.raises(ShardError, match="not a FusionRun shard"):
        read_shard(foreign)
    # A file that claims a kind but lacks its arrays (hand-edited, or written by another version).
    liar = tmp_path / "liar.safetensors"
    save_file({"doc_offsets": np.array([0, 1], np.int64)}, str(liar), metadata={"kind": "fused"})
    with pytest.raises(ShardError, match=r"fused shard lacks arrays \['choice', 'doc_index'"):
        read_shard(liar)


def test_bfloat16_and_unknown_dtypes_are_refused_by_name(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    arrays = {k: torch.from_numpy(v.copy()) for k, v in _extract_arrays().items()}
    arrays["doc_nll"] = arrays["doc_nll"].to(torch.bfloat16)  # e.g. written by a torch job in bf16
    path = tmp_path / "bf16.safetensors"
    save_file(arrays, str(path), metadata={"kind": "extract", "format_version": "1", "meta": "{}"})
    with pytest.raises(ShardError, match="array doc_nll has dtype bfloat16, expected one of \\['float32'\\]"):
        read_shard(path, "extract")
    arrays["doc_nll"] = arrays["doc_nll"].float()
    arrays["gold_logprob"] = arrays["gold_logprob"].to(torch.float8_e4m3fn)
    save_file(arrays, str(path), metadata={"kind": "extract", "format_version": "1", "meta": "{}"})
    with pytest.raises(ShardError, match="array gold_logprob has dtype F8_E4M3"):
        read_shard(path, "extract")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.update(topk_ids=a["topk_ids"].astype(np.int64)), "topk_ids has dtype int64"),
        (lambda a: a.update(gold_logprob=a["gold_logprob"][:, None]), "gold_logprob has 2 dimensions"),
        (
            lambda a: a.update(token_nbytes=a["token_nbytes"][:-1]),
            r"token_nbytes has 12 rows, expected 13 \(N\)",
        ),
        (lambda a: a.update(doc_nll=a["doc_nll"][:2]), r"doc_nll has 2 rows, expected 3 \(D\)"),
        (lambda a: a.update(topk_logprobs=a["topk_logprobs"][:, :3]), r"disagree on width: \[3, 4\]"),
        (lambda a: a.update(doc_offsets=np.array([0, 7, 6, 13], np.int64)), "never decrease"),
        (lambda a: a.update(doc_offsets=np.array([1, 7, 8, 13], np.int64)), "must start at 0"),
        (lambda a: a.pop("doc_n_pred"), r"lacks arrays \['doc_n_pred'\]"),
    ],
)
def test_validation_names_the_array(tmp_path: Path, change, message: str) -> None:
    arrays = _extract_arrays()
    change(arrays)
    with pytest.raises(ShardError, match=message):
        write_shard(tmp_path / "s.safetensors", "extract", arrays)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temp file


def test_fused_choice_is_per_document_or_per_token() -> None:
    base = {
        "doc_index": np.arange(2, dtype=np.int64),
        "doc_offsets": np.array([0, 2, 5], np.int64),
        "input_ids": np.zeros(5, np.uint16),
        "target_ids": np.full((5, 3), -1, np.int32),
        "target_probs": np.zeros((5, 3), np.float16),
    }
    validate_arrays("fused", {**base, "choice": np.zeros(2, np.int8)}, "f")
    validate_arrays("fused", {**base, "choice": np.zeros(5, np.int8)}, "f")
    with pytest.raises(ShardError, match="choice has 3 rows; expected 2 or 5"):
        validate_arrays("fused", {**base, "choice": np.zeros(3, np.int8)}, "f")
    with pytest.raises(ShardError, match="unknown shard kind 'fusion'"):
        validate_arrays("fusion", base, "f")


def test_failed_write_keeps_the_previous_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = write_shard(tmp_path / "s.safetensors", "extract", _extract_arrays(seed=1))
    import safetensors.numpy

    def crash(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        write_shard(tmp_path / "s.safetensors", "extract", _extract_arrays(seed=2))
    assert sha256_file(first.path) == first.sha256  # the old shard is whole
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]


def test_empty_shard_and_raw_kind(tmp_path: Path) -> None:
    info = write_shard(tmp_path / "raw.safetensors", "raw", {"text": np.frombuffer(b"hi", np.uint8)})
    assert read_shard(info.path, "raw")["text"].tobytes() == b"hi"
    assert json.loads(json.dumps(info.counts)) == {}
    assert os.path.getsize(info.path) == info.nbytes
    assert fmt.FORMAT_VERSION == "2"  # 2: packed top-k ids; shards of format 1 read as before


def test_shard_gets_the_usual_file_mode(tmp_path: Path) -> None:
    # Temporary files are 0600; a finished shard must be readable like any other new file (umask applied).
    mask = os.umask(0o022)
    try:
        info = write_shard(tmp_path / "m.safetensors", "raw", {"a": np.zeros(2, np.uint8)})
    finally:
        os.umask(mask)
    assert oct(info.path.stat().st_mode & 0o777) == oct(0o644)


def test_identical_shards_are_identical_bytes_across_processes(tmp_path: Path) -> None:
    # safetensors writes its metadata map in per-process hash order; the header must not depend on it,
    # or a deterministic rerun would change sha256s and force every dependant task to be redone.
    import subprocess
    import sys

    script = (
        "import sys, numpy as np\n"
        "from fusion.format import write_shard\n"
        "a = {'doc_offsets': np.array([0, 2], np.int64), 'x': np.arange(4, dtype=np.float16)}\n"
        "print(write_shard(sys.argv[1], 'raw', a, meta={'model': 'm', 'top_k': 10, 'b': [1, 2]}).sha256)\n"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / f"{i}.safetensors")],
            check=True,
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        ).stdout.strip()
        for i in range(4)
    }
    assert len(digests) == 1
    shard = read_shard(tmp_path / "0.safetensors", "raw")
    assert shard.meta == {"model": "m", "top_k": 10, "b": [1, 2]}


def test_unreadable_header_is_named(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "h.safetensors"
    save_file({"x": np.zeros(1, np.uint8)}, str(path), metadata={"fusionrun": "{not json"})
    with pytest.raises(ShardError, match=r"h\.safetensors: unreadable FusionRun header"):
        read_shard(path)


@pytest.mark.parametrize(
    ("top", "bits"),
    [(0, 1), (1, 2), (254, 8), (49_151, 16), (262_143, 19), (151_645, 18), ((1 << 31) - 2, 31)],
)
def test_ids_pack_to_the_bits_their_largest_id_needs_and_unpack_exactly(top: int, bits: int) -> None:
    # Each id + 1 is stored (-1, an empty entry, is 0): ids up to 2**b - 2 take b bits.
    rng = np.random.default_rng(top)
    ids = rng.integers(-1, top + 1, (7, 13)).astype(np.int32)
    ids[3, 5], ids[0, 0] = top, -1
    assert fmt.id_bits(ids) == bits
    packed = fmt.pack_ids(ids, bits)
    assert packed.dtype == np.uint8 and packed.shape == (7, (13 * bits + 7) // 8)
    np.testing.assert_array_equal(fmt.unpack_ids(packed, bits, 13, "int32"), ids)


def test_hand_packed_bits() -> None:
    # ids 0, 2, -1 in 2 bits each (stored 1, 3, 0): 0b00_11_01 in one little-endian byte = 13.
    ids = np.array([[0, 2, -1]], np.int32)
    assert fmt.pack_ids(ids, 2).tolist() == [[0b001101]]
    # Large arrays pack a bounded number of ids at a time (here 8): the rows join up exactly.
    many = np.arange(-1, 299, dtype=np.int32).reshape(100, 3)
    old = fmt._PACK_ENTRIES
    try:
        fmt._PACK_ENTRIES = 8
        packed = fmt.pack_ids(many, 9)
        np.testing.assert_array_equal(fmt.unpack_ids(packed, 9, 3, "int32"), many)
    finally:
        fmt._PACK_ENTRIES = old
    np.testing.assert_array_equal(fmt.unpack_ids(fmt.pack_ids(many, 9), 9, 3, "int32"), many)


def _fused_arrays(vocab: int, k: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    offsets = np.array([0, 6, 9], np.int64)
    ids = rng.integers(0, vocab, (9, k)).astype(np.int32)
    ids[:, -3:] = -1  # empty entries
    return {
        "doc_index": np.array([0, 1], np.int64),
        "doc_offsets": offsets,
        "input_ids": rng.integers(0, min(vocab, 65536), 9).astype(np.uint16),
        "target_ids": ids,
        "target_probs": np.full((9, k), 0.1, np.float16),
        "choice": np.array([0, 1], np.int8),
    }


def test_shards_store_packed_ids_and_readers_see_the_arrays_written(tmp_path: Path) -> None:
    # Gemma's 262k vocabulary: 19 bits an entry instead of int32's 32 (10 entries: 24 bytes, not 40).
    arrays = _fused_arrays(262_144)
    arrays["target_ids"][0, 0] = 262_143
    info = write_shard(tmp_path / "f.safetensors", "fused", arrays)
    shard = read_shard(info.path, "fused", info.sha256)
    assert shard.packed == {"target_ids": {"bits": 19, "width": 10, "dtype": "int32"}}
    assert shard._h.get_slice("target_ids").get_shape() == [9, 24]
    got = shard["target_ids"]
    assert got.dtype == np.int32 and got.shape == (9, 10)
    np.testing.assert_array_equal(got, arrays["target_ids"])
    np.testing.assert_array_equal(shard.rows("target_ids", 4, 7), arrays["target_ids"][4:7])
    assert shard.rows("target_ids", 9, 12).shape == (0, 10)
    unpacked = sum(a.nbytes for a in arrays.values())
    assert unpacked - (info.nbytes - struct.unpack("<Q", info.path.read_bytes()[:8])[0] - 8) == 9 * (40 - 24)
    # ids that fit their dtype already (uint16 at 16 bits) and raw arrays stay as they are
    ex = _extract_arrays(k=10)
    ex["topk_ids"][0, 0] = 65_534
    assert read_shard(write_shard(tmp_path / "e.safetensors", "extract", ex).path).packed == {}


def test_a_format_1_shard_reads_as_before(tmp_path: Path) -> None:
    """Shards written before packing (int32 ids, no "packed" in the header) stay readable as they are."""
    from safetensors.numpy import save_file

    arrays = _fused_arrays(262_144)
    doc = {"kind": "fused", "format_version": "1", "meta": {}}
    path = tmp_path / "old.safetensors"
    save_file(arrays, str(path), metadata={"fusionrun": json.dumps(doc)})
    shard = read_shard(path, "fused")
    assert shard.packed == {}
    np.testing.assert_array_equal(shard["target_ids"], arrays["target_ids"])


def test_a_packed_array_that_does_not_match_its_header_is_refused(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    arrays = _fused_arrays(262_144)
    arrays["target_ids"] = np.zeros((9, 20), np.uint8)  # 19 bits x 10 entries need 24 bytes a row
    doc = {
        "kind": "fused",
        "format_version": "2",
        "meta": {},
        "packed": {"target_ids": {"bits": 19, "width": 10, "dtype": "int32"}},
    }
    path = tmp_path / "bad.safetensors"
    save_file(arrays, str(path), metadata={"fusionrun": json.dumps(doc)})
    with pytest.raises(ShardError, match=r"packed arrays \['target_ids'\] do not match their header"):
        read_shard(path)


def test_bench_storage_repacks_a_runs_format_1_shards(tmp_path: Path, capsys) -> None:
    """bench.storage --repack: a run's shards as stored (here format 1, int32 ids) and as written now."""
    from safetensors.numpy import save_file

    from bench.storage import repack

    arrays = _extract_arrays(
        n_docs=400, k=10
    )  # 5 + 1 + 7 + 397 * 3 = 1,204 tokens: the header is a small share
    arrays["topk_ids"] = arrays["topk_ids"].astype(np.int32)
    arrays["topk_ids"][0, 0] = 262_142  # Gemma's vocabulary: 18 bits
    shard = tmp_path / "run" / "extract" / "gemma3" / "shard-00000.safetensors"
    shard.parent.mkdir(parents=True)
    save_file(arrays, str(shard), metadata={"fusionrun": json.dumps({"kind": "extract", "meta": {}})})
    shard.with_name("shard-00000.manifest.json").write_text("{}")
    assert repack(tmp_path / "run") == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    before, now = float(row[3]), float(row[4])
    assert row[0] == "extract/gemma3/shard-00000" and row[1:3] == ["10", "1,204"] and row[5] == "18"
    assert before - now == pytest.approx(40 - 23, abs=0.5)  # 10 ids: 40 B as int32, 23 B in 18 bits
    assert repack(tmp_path / "empty") == 1
