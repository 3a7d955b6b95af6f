"""fusion.continuation: a source token the target's own candidates extend shares its probability among them
(hand-computed rows on hand-made vocabularies, then through exact alignment on real tokenizers)."""

from __future__ import annotations

import numpy as np
import pytest

from fusion.align import needed_source_ids
from fusion.continuation import BYTES_COMPARED, ByteTable, split_by_target
from fusion.exact import align_shard_exact
from fusion.project import build_projection, sum_duplicates
from fusion.tokens import TokenizerView, encode_documents
from tests.test_exact import extract_arrays, shard, text_arrays

# Target: 1 ' re', 2 ' return', 3 ' result', 4 ' x', 5 ' r'. Source: 1 ' re', 2 ' x', 3 ' y', 4 ' return'.
TGT = TokenizerView.from_token_bytes("t", [b"<eos>", b" re", b" return", b" result", b" x", b" r"], eos_id=0)
SRC = TokenizerView.from_token_bytes("s", [b"</s>", b" re", b" x", b" y", b" return"], eos_id=0)
SPELLED = np.array([-1, 1, 4, -1, 2])  # source id -> the target id that spells it (' y': none)


def split(src_row, src_p, tgt_row, tgt_p, rows=None):
    """One or more rows through split_by_target and sum_duplicates -> {target id: probability} per row."""
    src_ids = np.array(src_row, ndmin=2)
    tgt_ids = np.array(tgt_row, ndmin=2)
    with np.errstate(divide="ignore"):
        src_lp, tgt_lp = np.log(np.array(src_p, ndmin=2)), np.log(np.array(tgt_p, ndmin=2))
    proj = np.where(src_ids >= 0, SPELLED[np.maximum(src_ids, 0)], -1)
    ids, lp = split_by_target(
        proj, src_ids, src_lp, tgt_ids, tgt_lp, ByteTable.of(SRC), ByteTable.of(TGT), rows
    )
    ids, lp = sum_duplicates(ids, lp)
    return [
        {int(i): round(float(np.exp(v)), 6) for i, v in zip(r_ids, r_lp, strict=True) if i >= 0}
        for r_ids, r_lp in zip(ids, lp, strict=True)
    ]


def test_byte_table_pads_truncates_and_leaves_specials_empty() -> None:
    long = b"x" * (BYTES_COMPARED + 5)
    view = TokenizerView.from_token_bytes("v", [b"<eos>", b"ab", long, b""], eos_id=0)
    table = ByteTable.of(view)
    assert table.lengths.tolist() == [0, 2, BYTES_COMPARED + 5, 0]
    assert table.bytes[1, :3].tolist() == [ord("a"), ord("b"), 0]
    assert table.bytes[2].tolist() == [ord("x")] * BYTES_COMPARED
    assert not table.bytes[0].any() and not table.bytes[3].any()


def test_a_prefix_token_is_split_by_the_targets_probabilities() -> None:
    # ' re' 0.6: the target extends it with ' return' 0.3 and ' result' 0.1 -> 0.45 and 0.15; ' x' stays.
    (row,) = split([1, 2], [0.6, 0.3], [2, 3, 4], [0.3, 0.1, 0.5])
    assert row == {2: 0.45, 3: 0.15, 4: 0.3}


def test_the_spelled_token_takes_its_share_when_the_target_holds_it() -> None:
    # The target holds ' re' itself (0.1) beside ' return' (0.3): 0.6 splits 1:3.
    (row,) = split([1], [0.6], [1, 2], [0.1, 0.3])
    assert row == {1: 0.15, 2: 0.45}


def test_entries_nothing_extends_keep_their_spelling() -> None:
    # No target entry extends ' re' (' r' is shorter: a prefix, not a continuation): unchanged.
    (row,) = split([1, 2], [0.6, 0.3], [5, 4], [0.5, 0.4])
    assert row == {1: 0.6, 4: 0.3}
    # An entry the projection dropped (' y') carries nothing; an equal-length token is no continuation.
    (row,) = split([3, 4], [0.5, 0.2], [2], [0.9])
    assert row == {2: 0.2}


def test_rows_not_allowed_and_empty_target_rows_are_left_alone() -> None:
    rows = split(
        [[1, 2], [1, 2]],
        [[0.6, 0.3], [0.6, 0.3]],
        [[2, 3], [2, 3]],
        [[0.3, 0.1]] * 2,
        np.array([False, True]),
    )
    assert rows == [{1: 0.6, 4: 0.3}, {2: 0.45, 3: 0.15, 4: 0.3}]
    (row,) = split([1, 2], [0.6, 0.3], [-1, -1], [0.0, 0.0])
    assert row == {1: 0.6, 4: 0.3}


def test_mass_is_conserved_on_random_rows() -> None:
    rng = np.random.default_rng(0)
    n = 5000
    src_ids = rng.integers(1, 5, size=(n, 4))
    tgt_ids = rng.integers(1, 6, size=(n, 3))
    src_p = rng.dirichlet(np.ones(4), size=n) * 0.9
    tgt_p = rng.dirichlet(np.ones(3), size=n) * 0.8
    proj = SPELLED[src_ids]
    ids, lp = split_by_target(
        proj, src_ids, np.log(src_p), tgt_ids, np.log(tgt_p), ByteTable.of(SRC), ByteTable.of(TGT)
    )
    kept = np.where(proj >= 0, src_p, 0.0).sum(axis=1)
    got = np.where(ids >= 0, np.exp(lp.astype(np.float64)), 0.0).sum(axis=1)
    np.testing.assert_allclose(got, kept, rtol=1e-5)
    # Every target id that received mass is the spelled projection or one of the row's target entries.
    allowed = np.concatenate([proj, tgt_ids], axis=1)
    assert all(set(r[r >= 0]) <= set(a) for r, a in zip(ids, allowed, strict=True))


@pytest.mark.parametrize("continuation", [False, True])
def test_exact_alignment_on_real_tokenizers(
    tmp_path, smollm2_tokenizer, smollm2_view, mistral_tokenizer, mistral_view, continuation
) -> None:
    text = "we return it"
    (src_doc,) = encode_documents(smollm2_tokenizer, [text])
    (tgt_doc,) = encode_documents(mistral_tokenizer, [text])
    s_id, t_id = smollm2_tokenizer.convert_tokens_to_ids, mistral_tokenizer.convert_tokens_to_ids
    # Each document ends with its tokenizer's EOS.
    assert smollm2_tokenizer.convert_ids_to_tokens(src_doc.tolist())[:3] == ["we", "Ġreturn", "Ġit"]
    assert mistral_tokenizer.convert_ids_to_tokens(tgt_doc.tolist())[:3] == ["▁we", "▁return", "▁it"]
    # Row 0 (after 'we'): SmolLM2 says ' re' 0.5, ' x' 0.25; Mistral's own row: '▁return' 0.3,
    # '▁returns' 0.1, '▁x' 0.2. ' re' spells Mistral '▁re', which the target's row does not hold.
    src_row = ([s_id("Ġre"), s_id("Ġx"), -1], np.log([0.5, 0.25, 1e-30]))
    tgt_row = ([t_id("▁return"), t_id("▁returns"), t_id("▁x")], np.log([0.3, 0.1, 0.2]))
    src = shard(tmp_path, "src", extract_arrays([src_doc], smollm2_view, [0], {0: src_row}, k=3))
    tgt = shard(tmp_path, "tgt", extract_arrays([tgt_doc], mistral_view, [0], {0: tgt_row}, k=3))
    proj = build_projection(smollm2_tokenizer, mistral_tokenizer, needed_source_ids(src))
    out, _ = align_shard_exact(
        src, tgt, smollm2_view, mistral_view, proj, *text_arrays([text]), continuation=continuation
    )
    got = {
        int(i): round(float(np.exp(v)), 3)
        for i, v in zip(out["topk_ids"][0], out["topk_logprobs"][0].astype(float), strict=True)
        if i >= 0 and v > -20
    }
    if continuation:  # 0.5 split 3:1 between '▁return' and '▁returns'
        assert got == {t_id("▁return"): 0.375, t_id("▁returns"): 0.125, t_id("▁x"): 0.25}
    else:
        assert got == {t_id("▁re"): 0.5, t_id("▁x"): 0.25}
