"""fusion.align: DTW against hand-worked matrices and a plain DP, and the aligned-shard transform on real
tokenizers (SmolLM2 byte-level BPE -> Mistral SentencePiece) with hand-derived expected rows."""

from __future__ import annotations

import numpy as np
import pytest

from bench import reference
from fusion.align import (
    AlignmentError,
    align_shard,
    align_shard_with_stats,
    dtw_align,
    dtw_backtrack,
    dtw_matrix,
    map_topk,
    needed_source_ids,
    one_to_one,
    token_costs,
)
from fusion.format import read_shard, write_shard
from fusion.tokens import TokenizerView, encode_documents
from fusion.vocab import build_vocab_map

NEG = -np.inf


# ------------------------------------------------------------------------------------------------
# DTW


def test_dtw_hand_worked_one_to_many():
    # costs: ab-a 1, ab-b 1, ab-c 2 / c-a 1, c-b 1, c-c 0
    src, tgt = [b"ab", b"c"], [b"a", b"b", b"c"]
    assert token_costs(["ab", "c"], ["a", "b", "c"]).tolist() == [[1, 1, 2], [1, 1, 0]]
    # D[0] = 1, 2, 4; D[1,0] = 1+1; D[1,1] = 1+min(2, 2, 1); D[1,2] = 0+min(4, 2, 2)
    assert dtw_matrix(token_costs(["ab", "c"], ["a", "b", "c"])).tolist() == [[1, 2, 4], [2, 2, 2]]
    # From (1,2): diagonal 2 ties left 2 -> diagonal; then row 0 -> left.
    sp, tp = dtw_align(src, tgt)
    assert list(zip(sp.tolist(), tp.tolist(), strict=True)) == [(0, 0), (0, 1), (1, 2)]
    assert one_to_one(sp, tp, 2, 3).tolist() == [-1, -1, 1]


def test_dtw_hand_worked_diagonal():
    src, tgt = [b"a", b"bc", b"d"], [b"ab", b"c", b"d"]
    cost = token_costs([s.decode() for s in src], [t.decode() for t in tgt])
    assert cost.tolist() == [[1, 1, 1], [2, 1, 2], [2, 1, 0]]
    assert dtw_matrix(cost).tolist() == [[1, 2, 3], [3, 2, 4], [5, 3, 2]]
    sp, tp = dtw_align(src, tgt)
    assert (sp.tolist(), tp.tolist()) == ([0, 1, 2], [0, 1, 2])
    assert one_to_one(sp, tp, 3, 3).tolist() == [0, 1, 2]


def test_backtrack_prefers_diagonal_then_source_step():
    acc = np.array([[5, 1], [1, 9]])  # at (1,1): diagonal 5, up 1, left 1 -> up (source step)
    sp, tp = dtw_backtrack(acc)
    assert (sp.tolist(), tp.tolist()) == ([0, 0, 1], [0, 1, 1])
    acc = np.array([[1, 1], [1, 9]])  # diagonal ties both -> diagonal
    assert [a.tolist() for a in dtw_backtrack(acc)] == [[0, 1], [0, 1]]


def test_vectorised_dtw_equals_plain_dp_on_random_inputs():
    rng = np.random.default_rng(7)
    alphabet = b"ab \n\xc3"
    for _ in range(60):
        n, m = (int(x) for x in rng.integers(1, 14, 2))
        src = [bytes(rng.choice(list(alphabet), rng.integers(0, 5))) for _ in range(n)]
        tgt = [bytes(rng.choice(list(alphabet), rng.integers(0, 5))) for _ in range(m)]
        d, path = reference.dtw(src, tgt)
        cost = token_costs([s.decode("latin-1") for s in src], [t.decode("latin-1") for t in tgt])
        assert dtw_matrix(cost).tolist() == d
        sp, tp = dtw_align(src, tgt)
        assert list(zip(sp.tolist(), tp.tolist(), strict=True)) == path


def test_dtw_refuses_empty_sequences():
    with pytest.raises(ValueError, match="non-empty"):
        dtw_align([], [b"a"])


# ------------------------------------------------------------------------------------------------
# Top-k mapping


def test_map_topk_drops_unmapped_merges_duplicates_and_pads():
    src = TokenizerView.from_token_bytes("s", [b"<e>", b"x", b"y", b"z", b"w"], eos_id=0, special_ids=[4])
    tgt = TokenizerView.from_token_bytes("t", [b"x", b"</s>", b"y"], eos_id=1)
    vmap = build_vocab_map(src, tgt, "mined")
    # EOS by role; z is one edit from x (0) and from y (2): lowest id; the special 'w' has no counterpart.
    assert vmap.ids.tolist() == [1, 0, 2, 0, -1]
    ids = np.array([[3, 2, 1, 4], [4, 1, 2, -1], [2, 3, 0, 1], [3, 2, 0, 4]])
    lps = np.array(
        [
            [-0.5, -0.7, -0.1, -0.2],
            [-0.1, -1.0, -2.0, NEG],
            [-1.0, -0.5, -3.0, np.nan],
            [-0.2, -0.4, -0.6, -0.8],
        ]
    )
    got_ids, got_lp = map_topk(ids, lps, vmap)
    # row 0: z->x at -0.5 loses to x itself at -0.1 (merged, highest kept); w dropped; best first.
    # row 1: w and the empty slot dropped. row 2: unsorted input; a NaN entry counts as empty.
    # row 3: z->x -0.2, y -0.4, EOS -> target EOS -0.6.
    assert got_ids.tolist() == [[0, 2, -1, -1], [0, 2, -1, -1], [0, 2, 1, -1], [0, 2, 1, -1]]
    assert got_ids.dtype == np.int32 and got_lp.dtype == np.float32
    np.testing.assert_allclose(
        got_lp,
        [[-0.1, -0.7, NEG, NEG], [-1.0, -2.0, NEG, NEG], [-0.5, -1.0, -3.0, NEG], [-0.2, -0.4, -0.6, NEG]],
        rtol=1e-6,
    )
    em_ids, em_lp = map_topk(ids, lps, vmap, exact_only=True)
    # EM: z is not an exact match, so row 3 starts with y.
    assert em_ids.tolist()[3] == [2, 1, -1, -1]
    np.testing.assert_allclose(em_lp[3], [-0.4, -0.6, NEG, NEG], rtol=1e-6)
    assert em_ids.tolist()[0] == [0, 2, -1, -1]


# ------------------------------------------------------------------------------------------------
# Shard transform on real tokenizers


TEXT = "Hello world.\n\tjson.dumps(x)"
SRC_IDS = [19556, 905, 30, 198, 197, 5518, 30, 19567, 24, 104, 25, 2]  # SmolLM2
TGT_IDS = [22557, 1526, 28723, 13, 12, 3371, 28723, 28715, 10575, 28732, 28744, 28731, 2]  # Mistral
K = 4


def _extract_arrays(
    docs: list[np.ndarray],
    view: TokenizerView,
    doc_index: list[int],
    topk: dict[int, tuple[list[int], list[float]]] | None = None,
) -> dict[str, np.ndarray]:
    """Extract-shard arrays for given token ids. Default top-k row at position p of a document:
    [next gold id, 0, 216, 30] with log-probs [-0.25, -2, -3, -4]; `topk` overrides rows by global index."""
    ids = np.concatenate(docs)
    n = len(ids)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    nxt = np.concatenate([np.append(d[1:], d[-1]) for d in docs])
    topk_ids = np.stack([nxt, np.zeros(n), np.full(n, 216), np.full(n, 30)], axis=1)
    topk_lp = np.tile([-0.25, -2.0, -3.0, -4.0], (n, 1))
    for row, (i, lp) in (topk or {}).items():
        topk_ids[row], topk_lp[row] = i, lp
    gold = -0.25 - 0.125 * np.arange(n)
    gold[offsets[1:] - 1] = 0
    return {
        "doc_index": np.array(doc_index, dtype=np.int64),
        "doc_offsets": offsets,
        "input_ids": ids.astype(np.uint16),
        "token_nbytes": view.nbytes[ids].astype(np.uint16),
        "topk_ids": topk_ids.astype(np.uint16),
        "topk_logprobs": topk_lp.astype(np.float16),
        "gold_logprob": gold.astype(np.float16),
        "doc_nll": np.array([3.5 + i for i in range(len(docs))], dtype=np.float32),
        "doc_pred_nbytes": np.array([len(d) * 2 for d in docs], dtype=np.int64),
        "doc_n_pred": np.array([len(d) - 1 for d in docs], dtype=np.int32),
    }


def _shard(tmp_path, name, arrays):
    write_shard(tmp_path / f"{name}.safetensors", "extract", arrays)
    return read_shard(tmp_path / f"{name}.safetensors", "extract")


@pytest.fixture
def known_pair(tmp_path, smollm2_tokenizer, smollm2_view, mistral_tokenizer, mistral_view):
    (src_doc,) = encode_documents(smollm2_tokenizer, [TEXT])
    (tgt_doc,) = encode_documents(mistral_tokenizer, [TEXT])
    assert src_doc.tolist() == SRC_IDS and tgt_doc.tolist() == TGT_IDS
    nl2 = smollm2_tokenizer.convert_tokens_to_ids("ĊĊ")
    # Source row 2 ('.' -> '\n'): '\n' and '\n\n' both map to Mistral <0x0A>: merged, best kept.
    row2 = ([198, nl2, 0, 216], [-0.5, -1.2, -2.0, -3.0])
    src = _shard(tmp_path, "src", _extract_arrays([src_doc], smollm2_view, [7], {2: row2}))
    tgt = _shard(tmp_path, "tgt", _extract_arrays([tgt_doc], mistral_view, [7]))
    return src, tgt


def test_align_shard_mined_on_a_known_string(known_pair, smollm2_view, mistral_view):
    src, tgt = known_pair
    vmap = build_vocab_map(smollm2_view, mistral_view, "mined", src_ids=needed_source_ids(src))
    # 'dumps' has no Mistral token; its nearest is 'umps' (one edit), which is where DTW pairs it.
    assert vmap.ids[19567] == 10575 and not vmap.exact[19567]
    out, stats = align_shard_with_stats(src, tgt, smollm2_view, mistral_view, vmap, "mined")
    write_shard(src.path.parent / "aligned.safetensors", "aligned", out)  # passes the format's contract

    # DTW pairs (s, t): 0-0 1-1 2-2 3-3 4-4 5-5 6-6 6-7 7-8 8-9 9-10 10-11 11-12.
    # t=0 'Hello' vs ' Hello' is 1:1 but rejected (map sends 'Hello' to 'Hello', not '▁Hello');
    # t=6, 7 are 1:many ('.' against '.', 'd'); t=8 'dumps' -> 'umps' accepted by the map; t=12 predicts none.
    assert out["aligned"].tolist() == [0, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0]
    # Fallback rows: one-hot on the NEXT target token (defect 1), log-prob 0.
    for t in (0, 6, 7):
        assert out["topk_ids"][t].tolist() == [TGT_IDS[t + 1], -1, -1, -1]
        assert out["topk_logprobs"][t].astype(float).tolist() == [0.0, NEG, NEG, NEG]
    assert out["topk_ids"][0, 0] == 1526 and out["topk_ids"][0, 0] != TGT_IDS[0]
    assert out["topk_ids"][12].tolist() == [-1] * K
    assert np.isneginf(out["topk_logprobs"][12].astype(float)).all()
    # t=2 takes source row 2: '\n'(-0.5) and '\n\n'(-1.2) -> <0x0A> merged at -0.5; <|endoftext|> dropped;
    # 'Ġ' -> '▁' (-3).
    assert out["topk_ids"][2].tolist() == [13, 28705, -1, -1]
    assert out["topk_logprobs"][2].astype(float).tolist() == [-0.5, -3.0, NEG, NEG]
    # t=1 takes source row 1: ['.', <|endoftext|>, 'Ġ', '.'] -> '.'(-0.25) merged with '.'(-4), '▁'(-3).
    assert out["topk_ids"][1].tolist() == [28723, 28705, -1, -1]
    assert out["topk_logprobs"][1].astype(float).tolist() == [-0.25, -3.0, NEG, NEG]
    # t=8 takes source row 7 (non-exact MinED pair): ['(', <|endoftext|>, 'Ġ', '.'].
    assert out["topk_ids"][8].tolist() == [28732, 28705, 28723, -1]
    assert out["topk_logprobs"][8].astype(float).tolist() == [-0.25, -3.0, -4.0, NEG]
    # Gold figures of the source at the paired row s (gold_logprob -0.25 - s/8), bytes of token s+1.
    pairs = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 8: 7, 9: 8, 10: 9, 11: 10}
    expected = np.full(13, np.nan)
    for t, s in pairs.items():
        expected[t] = -0.25 - 0.125 * s
    np.testing.assert_array_equal(out["gold_logprob"].astype(float), expected.astype(np.float16))
    assert out["gold_nbytes"].tolist() == [0, 1, 1, 1, 4, 1, 0, 0, 1, 1, 1, 0, 0]  # t=4: 'json'; t=11: EOS
    assert out["doc_index"].tolist() == [7] and out["doc_offsets"].tolist() == [0, 13]
    assert (out["doc_nll"].tolist(), out["doc_pred_nbytes"].tolist(), out["doc_n_pred"].tolist()) == (
        [3.5],
        [24],
        [11],
    )
    assert (stats.positions, stats.one_to_one, stats.aligned, stats.exact) == (12, 10, 9, 8)
    assert stats.aligned_fraction == pytest.approx(9 / 12) and stats.exact_fraction == pytest.approx(8 / 12)
    assert stats.to_dict()["aligned"] == 9


def test_blockwise_top_k_mapping_gives_the_same_shard(known_pair, smollm2_view, mistral_view, monkeypatch):
    import fusion.align

    src, tgt = known_pair
    vmap = build_vocab_map(smollm2_view, mistral_view, "mined", src_ids=needed_source_ids(src))
    whole = align_shard(src, tgt, smollm2_view, mistral_view, vmap, "mined")
    monkeypatch.setattr(fusion.align, "_ROWS_PER_BLOCK", 2)
    blocks = align_shard(src, tgt, smollm2_view, mistral_view, vmap, "mined")
    for name, arr in whole.items():
        np.testing.assert_array_equal(blocks[name], arr, err_msg=name)


def test_align_shard_em_rejects_the_non_exact_pair(known_pair, smollm2_view, mistral_view):
    src, tgt = known_pair
    vmap = build_vocab_map(smollm2_view, mistral_view, "em", src_ids=needed_source_ids(src))
    out = align_shard(src, tgt, smollm2_view, mistral_view, vmap, "em")
    assert out["aligned"].tolist() == [0, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 0]
    assert out["topk_ids"][8].tolist() == [TGT_IDS[9], -1, -1, -1]  # one-hot on the next token
    assert out["topk_logprobs"][8].astype(float).tolist() == [0.0, NEG, NEG, NEG]
    # Exact matches only: 'Ġ' -> '▁' and '.' are exact, so row 2 is as under MinED, but '\n\n' is dropped.
    assert out["topk_ids"][2].tolist() == [13, 28705, -1, -1]


def test_documents_are_joined_on_doc_index(
    tmp_path, smollm2_tokenizer, smollm2_view, mistral_tokenizer, mistral_view
):
    texts = ["Hello world.", "json.dumps(x)"]
    src_docs = encode_documents(smollm2_tokenizer, texts)
    tgt_docs = encode_documents(mistral_tokenizer, texts)
    # The source shard holds the documents in the other order.
    src = _shard(tmp_path, "src", _extract_arrays(src_docs[::-1], smollm2_view, [11, 10]))
    tgt = _shard(tmp_path, "tgt", _extract_arrays(tgt_docs, mistral_view, [10, 11]))
    vmap = build_vocab_map(smollm2_view, mistral_view, "mined", src_ids=needed_source_ids(src))
    out = align_shard(src, tgt, smollm2_view, mistral_view, vmap, "mined")
    assert out["doc_index"].tolist() == [10, 11]
    assert out["doc_nll"].tolist() == [4.5, 3.5]  # the source's figures follow the target's order
    n0 = len(tgt_docs[0])
    # Document 10 ' Hello',' world','.',</s>: t=0 rejected -> one-hot on ' world'; 1, 2 aligned; last empty.
    assert out["aligned"][:n0].tolist() == [0, 1, 1, 0]
    assert out["topk_ids"][0, 0] == 1526
    # Document 11 ' json','.','d','umps','(','x',')',</s> against 'json','.','dumps','(','x',')',<eos>:
    # ' json' rejected 1:1; '.' pairs with '.' and 'd' (1:many); 'umps' <- 'dumps' accepted; then exact.
    assert out["aligned"][n0:].tolist() == [0, 0, 0, 1, 1, 1, 1, 0]
    assert out["topk_ids"][n0 : n0 + 3, 0].tolist() == [28723, 28715, 10575]  # the next target tokens


def test_mismatched_documents_are_refused(
    tmp_path, smollm2_tokenizer, smollm2_view, mistral_tokenizer, mistral_view
):
    src = _shard(
        tmp_path, "src", _extract_arrays(encode_documents(smollm2_tokenizer, [TEXT]), smollm2_view, [1])
    )
    tgt = _shard(
        tmp_path, "tgt", _extract_arrays(encode_documents(mistral_tokenizer, [TEXT]), mistral_view, [2])
    )
    vmap = build_vocab_map(smollm2_view, mistral_view, "mined", src_ids=needed_source_ids(src))
    with pytest.raises(AlignmentError, match=r"different documents \(doc_index differs, e.g. \[1, 2\]\)"):
        align_shard(src, tgt, smollm2_view, mistral_view, vmap, "mined")


def test_unusable_maps_and_methods_are_refused(known_pair, smollm2_view, mistral_view, qwen_view):
    src, tgt = known_pair
    lazy = build_vocab_map(smollm2_view, mistral_view, "mined", src_ids=np.array([905]))
    with pytest.raises(AlignmentError, match=r"vocabulary map lacks .* source ids.*needed_source_ids"):
        align_shard(src, tgt, smollm2_view, mistral_view, lazy, "mined")
    other = build_vocab_map(smollm2_view, qwen_view, "mined", src_ids=np.array([905]))
    with pytest.raises(ValueError, match="another target vocabulary"):
        align_shard(src, tgt, smollm2_view, mistral_view, other, "mined")
    em_map = build_vocab_map(smollm2_view, mistral_view, "em", src_ids=needed_source_ids(src))
    with pytest.raises(AlignmentError, match="MinED alignment needs a MinED vocabulary map"):
        align_shard(src, tgt, smollm2_view, mistral_view, em_map, "mined")
    with pytest.raises(AlignmentError, match="alignment method 'dtw'"):
        align_shard(src, tgt, smollm2_view, mistral_view, em_map, "dtw")
    # Shards extracted with another tokenizer than the view says.
    with pytest.raises(AlignmentError, match="target ids reach"):
        align_shard(
            src,
            tgt,
            smollm2_view,
            TokenizerView.from_token_bytes("tiny", [b"</s>", b"a"], 0),
            build_vocab_map(
                smollm2_view,
                TokenizerView.from_token_bytes("tiny", [b"</s>", b"a"], 0),
                "mined",
                src_ids=needed_source_ids(src),
            ),
            "mined",
        )
