"""fusion.diagnostics on hand-made shards with hand-computed figures.

Target (k = 2), two documents: doc 0 = tokens 10 11 12 (rows 0, 1 predict 11, 12; row 2 is its last),
doc 1 = tokens 20 21 (row 3 predicts 21; row 4 is its last). Gold bytes: row 0: 2, row 1: 4, row 3: 2.
  row 0: ids (11, 30) full p (.5, .25) -> q(11) = 2/3: log2(1.5) = 0.584963 bits
  row 1: ids (31, 32) full p (.5, .25) -> gold 12 missing: floor 1e-4 = 13.287712 bits
  row 3: ids (21, 33) full p (.25, .25) -> q(21) = 1/2: 1 bit
  full softmax log p(gold): 1, 4, 2 bits; MinCE's sequence CE (per byte): doc 0 5/6, doc 1 1.
Source (aligned shard): row 0 aligned ids (11, 30) p (.25, .25) -> q = 1/2: 1 bit; row 1 aligned ids (12, 31)
p (.5, .125) -> q = .8: log2(1.25) = 0.321928 bits; row 3 unaligned (one-hot on 21). Full log p of its own
gold: 2 and 1 bits. Its sequence CE: doc 0 2 nats / 6 bytes = 0.480898 bits/byte (< 5/6: MinCE picks it),
doc 1 5 nats / 2 bytes (> 1: the target).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fusion.diagnostics import diagnose, merge, own_topk_mass, verdict
from fusion.format import read_shard, write_shard
from fusion.fuse import FusionError

LOG2_15, FLOOR_BITS, LOG2_125 = math.log2(1.5), -math.log2(1e-4), math.log2(1.25)
TOL = 5e-3  # log-probabilities are stored as float16 (about 3 significant digits)


def _lp(p) -> np.ndarray:
    p = np.asarray(p, np.float64)
    with np.errstate(divide="ignore"):
        return np.where(p > 0, np.log(p), -np.inf).astype(np.float16)


def _doc_ce(nll, n_pred, nbytes) -> dict[str, np.ndarray]:
    return {
        "doc_nll": np.asarray(nll, np.float32),
        "doc_n_pred": np.asarray(n_pred, np.int32),
        "doc_pred_nbytes": np.asarray(nbytes, np.int64),
    }


def _target(path: Path):
    arrays = {
        "doc_index": np.array([0, 1], np.int64),
        "doc_offsets": np.array([0, 3, 5], np.int64),
        "input_ids": np.array([10, 11, 12, 20, 21], np.uint16),
        "token_nbytes": np.array([1, 2, 4, 1, 2], np.uint16),
        "topk_ids": np.array([[11, 30], [31, 32], [0, 1], [21, 33], [0, 1]], np.uint16),
        "topk_logprobs": _lp([[0.5, 0.25], [0.5, 0.25], [0.5, 0.5], [0.25, 0.25], [0.5, 0.5]]),
        "gold_logprob": _lp([0.5, 1 / 16, 1.0, 0.25, 1.0]),
        **_doc_ce([math.log(2) + math.log(16), math.log(4)], [2, 1], [6, 2]),
    }
    write_shard(path, "extract", arrays)
    return read_shard(path, "extract")


def _source(
    path: Path, rows01_ids=((11, 30), (12, 31)), rows01_p=((0.25, 0.25), (0.5, 0.125)), nll=(2.0, 5.0)
):
    ids = np.array([rows01_ids[0], rows01_ids[1], [-1, -1], [21, -1], [-1, -1]], np.int32)
    p = np.array([rows01_p[0], rows01_p[1], [0, 0], [1, 0], [0, 0]], np.float64)
    arrays = {
        "doc_index": np.array([0, 1], np.int64),
        "doc_offsets": np.array([0, 3, 5], np.int64),
        "topk_ids": ids,
        "topk_logprobs": _lp(np.where(ids >= 0, p, 0.0)),
        "aligned": np.array([1, 1, 0, 0, 0], np.uint8),
        "gold_logprob": np.array([math.log(0.25), math.log(0.5), np.nan, np.nan, np.nan], np.float16),
        "gold_nbytes": np.array([2, 4, 0, 0, 0], np.uint16),
        **_doc_ce(list(nll), [3, 2], [6, 2]),
    }
    write_shard(path, "aligned", arrays)
    return read_shard(path, "aligned")


@pytest.fixture
def shards(tmp_path):
    return _target(tmp_path / "t.safetensors"), _source(tmp_path / "s.safetensors")


def test_fused_view_figures_on_the_aligned_rows(shards) -> None:
    target, source = shards
    d = diagnose(target, {"gemma": source})
    s = d.sources[0]
    assert (s.positions, s.aligned, s.aligned_bytes) == (3, 2, 6)
    assert s.coverage == pytest.approx(2 / 3)
    assert s.target_bits == pytest.approx(LOG2_15 + FLOOR_BITS, abs=TOL)
    assert s.source_bits == pytest.approx(1 + LOG2_125, abs=TOL)
    assert s.token_oracle_bits == pytest.approx(LOG2_15 + LOG2_125, abs=TOL)
    assert (s.target_misses, s.source_misses) == (1, 0)
    assert (s.source_more, s.target_more) == (1, 1)  # row 1 the source, row 0 the target
    # Both hold the gold only on row 0 (2 bytes): target log2(1.5) bits, source 1 bit.
    assert (s.both_hit, s.both_hit_bytes) == (1, 2)
    assert (s.both_hit_target_bits, s.both_hit_source_bits) == (
        pytest.approx(LOG2_15, abs=TOL),
        pytest.approx(1, abs=TOL),
    )
    # Token-level MinCE by per-byte full-softmax CE: row 0 target 1/2 vs source 2/2 bits per byte -> the
    # target; row 1 target 4/4 vs source 1/4 -> the source.
    assert s.token_mince_bits == pytest.approx(LOG2_15 + LOG2_125, abs=TOL) and s.token_mince_source == 1
    # Full softmax on the same rows: target 1 + 4 bits, source 2 + 1 bits; the source is ahead on row 1.
    assert (s.target_full_bits, s.source_full_bits) == (pytest.approx(5, abs=TOL), pytest.approx(3, abs=TOL))
    assert s.source_full_more == 1
    # Mass kept after projection: (.25 + .25) + (.5 + .125); all 4 entries kept.
    assert s.kept_mass == pytest.approx(1.125, abs=TOL)
    assert s.kept_entries == 4 and s.width == 2


def test_per_document_oracle_and_mince(shards) -> None:
    target, source = shards
    s = diagnose(target, {"gemma": source}).sources[0]
    np.testing.assert_array_equal(s.doc_bytes, [6, 0])  # doc 1 has no aligned row: not compared
    assert s.doc_source_better.tolist() == [True, False]
    assert s.doc_mince_source.tolist() == [True, False]  # 0.4809 < 5/6; doc 1: 3.607 > 1
    assert s.doc_oracle_bits == pytest.approx(1 + LOG2_125, abs=TOL)
    assert s.mince_bits == pytest.approx(1 + LOG2_125, abs=TOL)
    assert s.mince_agreement == 1.0
    summary = s.summary()
    assert summary["fused_view_bpb"]["document_oracle"] == pytest.approx((1 + LOG2_125) / 6, abs=TOL)
    assert summary["documents"] == 1 and summary["documents_source_better"] == 1
    assert summary["mass"]["kept_after_projection"] == pytest.approx(0.5625, abs=TOL)


def test_overall_figures_over_every_position(shards) -> None:
    target, source = shards
    d = diagnose(target, {"gemma": source})
    assert (d.positions, d.nbytes) == (3, 8)
    assert d.target_bits == pytest.approx(LOG2_15 + FLOOR_BITS + 1, abs=TOL)
    # Oracle: row 0 the target, row 1 the source, row 3 only the target (the source is not aligned there).
    assert d.oracle_bits == pytest.approx(LOG2_15 + LOG2_125 + 1, abs=TOL)
    assert d.target_full_bits == pytest.approx(7, abs=TOL)
    assert d.target_misses == 1
    assert d.target_topk_mass == pytest.approx(0.75 + 0.75 + 0.5, abs=TOL)
    assert d.mince_counts == {"target": 1, "gemma": 1}
    assert "gemma is better than the target overall" in verdict(d)


def test_floor_temperature_and_top_k(shards) -> None:
    target, source = shards
    s = diagnose(target, {"gemma": source}, floor=1e-2).sources[0]
    assert s.target_bits == pytest.approx(LOG2_15 + math.log2(100), abs=TOL)
    # T = 2: q ~ p^(1/2): row 0 target sqrt(.5) / (sqrt(.5) + sqrt(.25)) = 0.585786 -> 0.771553 bits.
    s = diagnose(target, {"gemma": source}, temperature=2.0).sources[0]
    assert s.target_bits == pytest.approx(-math.log2(0.5857864) + FLOOR_BITS, abs=TOL)
    # top_k = 1: each row keeps its best entry; target row 0 and source row 1 then hold the gold alone.
    s = diagnose(target, {"gemma": source}, top_k=1).sources[0]
    assert s.target_bits == pytest.approx(0 + FLOOR_BITS, abs=TOL)
    # Source row 0 ties (.25, .25): the stored first (11, the gold) stays; row 1 keeps 12, the gold.
    assert s.source_bits == pytest.approx(0, abs=TOL)
    assert s.kept_entries == 2 and s.width == 1


def test_a_source_worse_everywhere_cannot_help(tmp_path) -> None:
    target = _target(tmp_path / "t.safetensors")
    worse = _source(tmp_path / "w.safetensors", rows01_ids=((40, 41), (42, 43)), nll=(9.0, 9.0))
    d = diagnose(target, {"worse": worse})
    s = d.sources[0]
    assert s.source_bits == pytest.approx(2 * FLOOR_BITS, abs=TOL) and s.source_misses == 2
    assert not s.doc_source_better.any() and not s.doc_mince_source.any()
    assert d.oracle_bits == pytest.approx(d.target_bits)
    assert verdict(d).startswith("no source is better than the target on any document")


def test_merge_adds_shards(shards) -> None:
    target, source = shards
    one = diagnose(target, {"gemma": source})
    two = merge([one, diagnose(target, {"gemma": source})])
    s1, s2 = one.sources[0], two.sources[0]
    assert s2.aligned == 2 * s1.aligned and s2.target_bits == pytest.approx(2 * s1.target_bits)
    assert len(s2.doc_bytes) == 4 and two.mince_counts == {"target": 2, "gemma": 2}
    assert s2.summary()["fused_view_bpb"] == s1.summary()["fused_view_bpb"]
    assert two.summary()["oracle_all_candidates_bpb"] == one.summary()["oracle_all_candidates_bpb"]


def test_own_top_k_mass_skips_each_documents_last_row(tmp_path) -> None:
    arrays = {
        "doc_index": np.array([0], np.int64),
        "doc_offsets": np.array([0, 3], np.int64),
        "input_ids": np.array([1, 2, 3], np.int32),
        "token_nbytes": np.array([1, 1, 1], np.uint16),
        "topk_ids": np.array([[1, 2], [3, 4], [5, 6]], np.int32),
        "topk_logprobs": _lp([[0.5, 0.25], [0.5, 0.5], [0.9, 0.05]]),
        "gold_logprob": _lp([0.5, 0.5, 1.0]),
        **_doc_ce([1.0], [2], [2]),
    }
    write_shard(tmp_path / "src.safetensors", "extract", arrays)
    rows, mass = own_topk_mass(read_shard(tmp_path / "src.safetensors"))
    assert rows == 2 and mass == pytest.approx(1.75, abs=TOL)


def test_mismatched_positions_and_bad_settings_are_refused(shards, tmp_path) -> None:
    target, source = shards
    with pytest.raises(FusionError, match="floor"):
        diagnose(target, {"gemma": source}, floor=0.0)
    with pytest.raises(FusionError, match="temperature"):
        diagnose(target, {"gemma": source}, temperature=0.0)
    other = {k: np.asarray(source[k]) for k in source.keys()}  # noqa: SIM118 (a shard, not a dict)
    other["doc_offsets"] = np.array([0, 2, 5], np.int64)
    write_shard(tmp_path / "o.safetensors", "aligned", other)
    with pytest.raises(FusionError, match="positions differ"):
        diagnose(target, {"gemma": read_shard(tmp_path / "o.safetensors")})
