"""fusion.fuse: MinCE / AvgCE on shards with known distributions and hand-computed fused rows.

The running case: one document of 3 target tokens, k = 2, candidates = target + one source.
  target row 0: ids (11, 20) p (.6, .2) -> softmax over the two: (.75, .25)
  target row 1: ids (12, 21) p (.5, .25) -> (2/3, 1/3); row 2 is the last row: empty
  source row 0: aligned, ids (20, 30) p (.5, .5); row 1: unaligned one-hot on the next gold token 12
  target: doc_nll 4 nats over 2 tokens and 8 bytes -> 2.0 nats/token, 4/ln2/8 = 0.72135 bits/byte
  source: doc_nll 3 nats over 1 token  and 8 bytes -> 3.0 nats/token, 3/ln2/8 = 0.54101 bits/byte
Per token the target is better, per byte the source is: ce_unit decides (defect 2).
AvgCE weights: r = exp(-CE) = (0.486097, 0.582160); w = softmax(r) = (0.476003, 0.523997).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fusion.format import read_shard, write_shard
from fusion.fuse import FusionError, fuse_shard, merge_rows

LN = np.log
W_T, W_S = 0.476002748195895, 0.523997251804105


def _extract(
    path: Path,
    topk_ids,
    topk_p,
    gold_lp,
    token_nbytes,
    offsets,
    doc_nll,
    n_pred,
    nbytes,
    input_ids=None,
    doc_index=None,
):
    offsets = np.asarray(offsets, dtype=np.int64)
    n = int(offsets[-1])
    arrays = {
        "doc_index": np.asarray(
            doc_index if doc_index is not None else np.arange(len(offsets) - 1), np.int64
        ),
        "doc_offsets": offsets,
        "input_ids": np.asarray(input_ids if input_ids is not None else np.arange(10, 10 + n), np.uint16),
        "token_nbytes": np.asarray(token_nbytes, np.uint16),
        "topk_ids": np.asarray(topk_ids, np.uint16),
        "topk_logprobs": LN(np.asarray(topk_p, np.float64)).astype(np.float16),
        "gold_logprob": np.asarray(gold_lp, np.float16),
        "doc_nll": np.asarray(doc_nll, np.float32),
        "doc_pred_nbytes": np.asarray(nbytes, np.int64),
        "doc_n_pred": np.asarray(n_pred, np.int32),
    }
    write_shard(path, "extract", arrays)
    return read_shard(path, "extract")


def _aligned(
    path: Path,
    topk_ids,
    topk_p,
    aligned,
    gold_lp,
    gold_nbytes,
    offsets,
    doc_nll,
    n_pred,
    nbytes,
    doc_index=None,
):
    ids = np.asarray(topk_ids, np.int32)
    with np.errstate(divide="ignore"):
        lp = np.where(ids >= 0, LN(np.asarray(topk_p, np.float64)), -np.inf)
    offsets = np.asarray(offsets, dtype=np.int64)
    arrays = {
        "doc_index": np.asarray(
            doc_index if doc_index is not None else np.arange(len(offsets) - 1), np.int64
        ),
        "doc_offsets": offsets,
        "topk_ids": ids,
        "topk_logprobs": lp.astype(np.float16),
        "aligned": np.asarray(aligned, np.uint8),
        "gold_logprob": np.asarray(gold_lp, np.float16),
        "gold_nbytes": np.asarray(gold_nbytes, np.uint16),
        "doc_nll": np.asarray(doc_nll, np.float32),
        "doc_pred_nbytes": np.asarray(nbytes, np.int64),
        "doc_n_pred": np.asarray(n_pred, np.int32),
    }
    write_shard(path, "aligned", arrays)
    return read_shard(path, "aligned")


@pytest.fixture
def case(tmp_path):
    target = _extract(
        tmp_path / "t.safetensors",
        [[11, 20], [12, 21], [0, 1]],
        [[0.6, 0.2], [0.5, 0.25], [0.5, 0.5]],
        gold_lp=[-1.0, -2.0, 0.0],
        token_nbytes=[3, 2, 0],
        offsets=[0, 3],
        doc_nll=[4.0],
        n_pred=[2],
        nbytes=[8],
        input_ids=[10, 11, 12],
    )
    source = _aligned(
        tmp_path / "s.safetensors",
        [[20, 30], [12, -1], [-1, -1]],
        [[0.5, 0.5], [1.0, 0.0], [0.0, 0.0]],
        aligned=[1, 0, 0],
        gold_lp=[-1.5, np.nan, np.nan],
        gold_nbytes=[4, 0, 0],
        offsets=[0, 3],
        doc_nll=[3.0],
        n_pred=[1],
        nbytes=[8],
    )
    return target, source


def test_min_ce_per_byte_picks_the_source_per_token_the_target(case) -> None:
    target, source = case
    by_byte = fuse_shard(target, [source], "minCE", "sequence", "byte")
    assert by_byte["choice"].tolist() == [1]
    assert by_byte["target_ids"].tolist() == [[20, 30], [12, -1], [-1, -1]]
    np.testing.assert_allclose(by_byte["target_probs"].astype(float), [[0.5, 0.5], [1, 0], [0, 0]], atol=1e-3)
    assert by_byte["choice"].dtype == np.int8 and by_byte["target_ids"].dtype == np.int32

    by_token = fuse_shard(target, [source], "minCE", "sequence", "token")
    assert by_token["choice"].tolist() == [0]
    assert by_token["target_ids"].tolist() == [[11, 20], [12, 21], [-1, -1]]  # last row empty
    np.testing.assert_allclose(
        by_token["target_probs"].astype(float), [[0.75, 0.25], [2 / 3, 1 / 3], [0, 0]], atol=1e-3
    )
    np.testing.assert_array_equal(by_token["input_ids"], [10, 11, 12])


def test_avg_ce_mixes_over_the_union_of_ids(case) -> None:
    target, source = case
    out = fuse_shard(target, [source], "avgCE", "sequence", "byte")
    assert out["choice"].tolist() == [-1]
    assert out["target_ids"].shape == (3, 4)  # K = k * candidates
    # row 0: 20 = .25 w_t + .5 w_s = 0.380999; 11 = .75 w_t = 0.357002; 30 = .5 w_s = 0.261999
    # row 1: 12 = 2/3 w_t + 1 w_s = 0.841332 (duplicate merged); 21 = 1/3 w_t = 0.158668
    assert out["target_ids"].tolist() == [[20, 11, 30, -1], [12, 21, -1, -1], [-1, -1, -1, -1]]
    np.testing.assert_allclose(
        out["target_probs"].astype(float),
        [[0.380999, 0.357002, 0.261999, 0], [0.841332, 0.158668, 0, 0], [0, 0, 0, 0]],
        atol=1e-3,
    )
    assert pytest.approx(1.0) == W_T + W_S
    assert pytest.approx(0.357002, abs=1e-6) == 0.75 * W_T


def test_temperature_softens_but_one_hots_stay(case) -> None:
    target, source = case
    out = fuse_shard(target, [source], "minCE", "sequence", "token", temperature=2.0)
    # softmax(ln p / 2) = sqrt(p) normalised:
    # (.6, .2) -> (0.633975, 0.366025); (.5, .25) -> (0.585786, 0.414214)
    np.testing.assert_allclose(
        out["target_probs"][:2].astype(float), [[0.633975, 0.366025], [0.585786, 0.414214]], atol=1e-3
    )
    src = fuse_shard(target, [source], "minCE", "sequence", "byte", temperature=2.0)
    np.testing.assert_allclose(src["target_probs"][1].astype(float), [1, 0])


def test_token_level_choices_per_position(case) -> None:
    target, source = case
    # per byte, row 0: target 1/ln2/2 = 0.7213 vs source 1.5/ln2/4 = 0.5410 -> source;
    # row 1: the source is unaligned (not eligible) -> target; row 2: nobody eligible -> index 0 (empty)
    out = fuse_shard(target, [source], "minCE", "token", "byte")
    assert out["choice"].tolist() == [1, 0, 0]
    assert out["target_ids"].tolist() == [[20, 30], [12, 21], [-1, -1]]
    # per token, row 0: target 1.0 vs source 1.5 -> target
    assert fuse_shard(target, [source], "minCE", "token", "token")["choice"].tolist() == [0, 0, 0]
    # AvgCE per position: row 0 has the same two CEs as the sequence case -> same weights; row 1 only the
    # target is eligible -> weight 1; row 2 stays empty.
    avg = fuse_shard(target, [source], "avgCE", "token", "byte")
    assert avg["choice"].tolist() == [-1, -1, -1]
    assert avg["target_ids"].tolist() == [[20, 11, 30, -1], [12, 21, -1, -1], [-1, -1, -1, -1]]
    np.testing.assert_allclose(
        avg["target_probs"].astype(float),
        [[0.380999, 0.357002, 0.261999, 0], [2 / 3, 1 / 3, 0, 0], [0, 0, 0, 0]],
        atol=1e-3,
    )


def test_top_k_keeps_each_candidates_best_entries_and_the_same_decisions(case) -> None:
    target, source = case
    # k = 1: each candidate keeps its most likely entry, renormalised to 1; MinCE's choice comes from the
    # gold log-probs, so it does not change (per token: the target).
    one = fuse_shard(target, [source], "minCE", "sequence", "token", top_k=1)
    assert one["choice"].tolist() == [0]
    assert one["target_ids"].tolist() == [[11], [12], [-1]]
    np.testing.assert_allclose(one["target_probs"].astype(float), [[1], [1], [0]])
    # AvgCE, same weights as without k: row 0 = target's 11 (W_T) + the source's first of its tied pair,
    # 20 (W_S); row 1 = 12 from both, merged to 1.
    avg = fuse_shard(target, [source], "avgCE", "sequence", "byte", top_k=1)
    assert avg["target_ids"].tolist() == [[20, 11], [12, -1], [-1, -1]]
    np.testing.assert_allclose(avg["target_probs"].astype(float), [[W_S, W_T], [1, 0], [0, 0]], atol=1e-3)
    # k at or above what is stored changes nothing
    full = fuse_shard(target, [source], "avgCE", "sequence", "byte")
    same = fuse_shard(target, [source], "avgCE", "sequence", "byte", top_k=10)
    np.testing.assert_array_equal(same["target_ids"], full["target_ids"])
    with pytest.raises(FusionError, match="topK must be at least 1"):
        fuse_shard(target, [source], top_k=0)


def test_without_the_target_and_ties(case, tmp_path) -> None:
    target, source = case
    out = fuse_shard(target, [source], "minCE", include_target=False)
    assert out["choice"].tolist() == [0]  # index over the candidates used: the only source
    assert out["target_ids"].tolist() == [[20, 30], [12, -1], [-1, -1]]
    # A source exactly as good as the target (same bits per byte): the tie goes to the target.
    tie = _aligned(
        tmp_path / "tie.safetensors",
        [[20, 30], [12, -1], [-1, -1]],
        [[0.5, 0.5], [1, 0], [0, 0]],
        aligned=[1, 0, 0],
        gold_lp=[-1, 0, 0],
        gold_nbytes=[1, 0, 0],
        offsets=[0, 3],
        doc_nll=[4.0],
        n_pred=[3],
        nbytes=[8],
    )
    assert fuse_shard(target, [tie], "minCE", "sequence", "byte")["choice"].tolist() == [0]
    with pytest.raises(FusionError, match="nothing to fuse"):
        fuse_shard(target, [], include_target=False)


def test_any_number_of_sources_and_per_document_choice(tmp_path) -> None:
    # Two documents (2 and 3 tokens), target + 3 sources. Per byte, document 0's best is source 3 and
    # document 1's best is source 1; rows of a document all come from its chosen candidate.
    off = [0, 2, 5]
    t = _extract(
        tmp_path / "t.safetensors",
        [[1, 2]] * 5,
        [[0.5, 0.5]] * 5,
        [-1] * 5,
        [1] * 5,
        off,
        doc_nll=[2.0, 6.0],
        n_pred=[1, 2],
        nbytes=[2, 3],
    )  # 1.443, 2.885 bits/byte
    cands = []
    for j, nll in enumerate([(3.0, 1.0), (2.5, 5.0), (1.0, 5.5)], start=1):
        cands.append(
            _aligned(
                tmp_path / f"s{j}.safetensors",
                [[10 * j, -1]] * 5,
                [[1, 0]] * 5,
                [1] * 5,
                [-1] * 5,
                [1] * 5,
                off,
                doc_nll=list(nll),
                n_pred=[1, 1],
                nbytes=[2, 3],
            )
        )
    out = fuse_shard(t, cands, "minCE", "sequence", "byte")
    assert out["choice"].tolist() == [3, 1]
    assert out["target_ids"][:, 0].tolist() == [30, 30, 10, 10, 10]
    avg = fuse_shard(t, cands, "avgCE")
    assert avg["target_ids"].shape == (5, 8)
    np.testing.assert_allclose(avg["target_probs"].astype(float).sum(1), 1.0, atol=2e-3)
    # Document 0 weights: CE (bits/byte) = nll / ln2 / 2 bytes for (target, s1, s2, s3).
    ce = np.array([2.0, 3.0, 2.5, 1.0]) / math.log(2) / 2
    w = np.exp(np.exp(-ce)) / np.exp(np.exp(-ce)).sum()
    row0 = dict(
        zip(avg["target_ids"][0].tolist(), avg["target_probs"][0].astype(float).tolist(), strict=True)
    )
    assert row0[10] == pytest.approx(w[1], abs=1e-3) and row0[30] == pytest.approx(w[3], abs=1e-3)
    assert row0[1] == pytest.approx(w[0] / 2, abs=1e-3)


def test_merge_rows_sums_duplicates_and_sorts() -> None:
    ids = np.array(
        [[5, 3, 5, -1, 3, 9], [-1, -1, -1, -1, -1, -1], [7, 7, 7, 7, 7, 7], [4, -1, 8, -1, -1, -1]], np.int32
    )
    p = np.array([[0.1, 0.2, 0.3, 0.9, 0.1, 0.3], [0.5] * 6, [1 / 6] * 6, [0.1, 0.3, 0.4, 0, 0, 0]])
    out_ids, out_p = merge_rows(ids, p)
    # row 0: 5 -> 0.4, 3 -> 0.3, 9 -> 0.3 (sum 1.0; the 0.9 under an empty id is dropped); ties by id
    # row 3: only 0.5 of mass on real ids (a candidate's row was empty): renormalised, 8 -> 0.8, 4 -> 0.2
    assert out_ids.tolist() == [
        [5, 3, 9, -1, -1, -1],
        [-1] * 6,
        [7, -1, -1, -1, -1, -1],
        [8, 4, -1, -1, -1, -1],
    ]
    np.testing.assert_allclose(
        out_p, [[0.4, 0.3, 0.3, 0, 0, 0], [0] * 6, [1, 0, 0, 0, 0, 0], [0.8, 0.2, 0, 0, 0, 0]], atol=1e-12
    )


def test_mismatched_documents_and_wrong_kinds_are_refused(case, tmp_path) -> None:
    target, source = case
    other = _aligned(
        tmp_path / "o.safetensors",
        [[1, -1]] * 3,
        [[1, 0]] * 3,
        [0] * 3,
        [0] * 3,
        [0] * 3,
        [0, 3],
        [1.0],
        [1],
        [1],
        doc_index=[42],
    )
    with pytest.raises(FusionError, match="documents differ"):
        fuse_shard(target, [other])
    longer = _aligned(
        tmp_path / "x.safetensors",
        [[1, -1]] * 4,
        [[1, 0]] * 4,
        [0] * 4,
        [0] * 4,
        [0] * 4,
        [0, 4],
        [1.0],
        [1],
        [1],
        doc_index=[0],
    )
    with pytest.raises(FusionError, match="positions differ"):
        fuse_shard(target, [longer])
    with pytest.raises(FusionError, match="must be an extract shard"):
        fuse_shard(source, [source])
    with pytest.raises(FusionError, match="must be an aligned shard"):
        fuse_shard(target, [target])
    with pytest.raises(FusionError, match="strategy"):
        fuse_shard(target, [source], strategy="maxCE")
    with pytest.raises(FusionError, match="temperature"):
        fuse_shard(target, [source], temperature=0.0)


def test_fused_arrays_write_as_a_fused_shard(case, tmp_path) -> None:
    target, source = case
    for level in ("sequence", "token"):
        info = write_shard(
            tmp_path / f"f-{level}.safetensors", "fused", fuse_shard(target, [source], level=level)
        )
        shard = read_shard(info.path, "fused", info.sha256)
        assert shard["choice"].shape == ((1,) if level == "sequence" else (3,))


def test_real_pipeline_extract_align_fuse(
    tmp_path, monkeypatch, smollm2_tokenizer, smollm2_view, mistral_tokenizer, mistral_view
) -> None:
    """Target llama + SmolLM2 tokenizer, source gpt_neox + Mistral tokenizer: extract both, align the source
    with fusion.align, fuse. The fused shard follows the decisions computed here from the extract shards."""
    import torch

    from fusion.align import align_shard, needed_source_ids
    from fusion.extract import extract_documents
    from fusion.models import random_init_model
    from fusion.tokens import encode_documents
    from fusion.vocab import build_vocab_map

    torch.set_num_threads(2)
    texts = [
        "def add(a, b):\n    return a + b\n",
        "The quick brown fox jumps over the lazy dog.",
        "import os\nprint(os.getcwd())\n",
    ]
    shards = {}
    for name, arch, tok, view, seed in (
        ("t", "llama", smollm2_tokenizer, smollm2_view, 1),
        ("s", "gpt_neox", mistral_tokenizer, mistral_view, 2),
    ):
        model = random_init_model(arch, view.vocab_size, hidden_size=16, num_heads=2, seed=seed)
        if (
            name == "t"
        ):  # a confidently wrong target (sharp random logits): worse than the source's near-uniform
            with torch.no_grad():
                model.get_output_embeddings().weight.mul_(200.0)
        arrays = extract_documents(model, view, encode_documents(tok, texts), np.arange(3), top_k=5)
        info = write_shard(tmp_path / f"{name}.safetensors", "extract", arrays)
        shards[name] = read_shard(info.path, "extract", info.sha256)
    tgt, src = shards["t"], shards["s"]
    vmap = build_vocab_map(mistral_view, smollm2_view, "mined", src_ids=needed_source_ids(src), workers=1)
    aligned_arrays = align_shard(src, tgt, mistral_view, smollm2_view, vmap, "mined")
    info = write_shard(tmp_path / "a.safetensors", "aligned", aligned_arrays)
    aligned = read_shard(info.path, "aligned", info.sha256)

    fused = fuse_shard(tgt, [aligned], "minCE", "sequence", "byte")
    write_shard(tmp_path / "f.safetensors", "fused", fused)
    bpb = [
        np.asarray(s["doc_nll"], np.float64) / math.log(2) / np.asarray(s["doc_pred_nbytes"])
        for s in (tgt, src)
    ]
    np.testing.assert_array_equal(fused["choice"], np.argmin(np.stack(bpb), axis=0))
    assert (fused["choice"] == 1).any()  # the source wins somewhere, so its rows are checked below
    off = np.asarray(tgt["doc_offsets"])
    ids, probs = fused["target_ids"], fused["target_probs"].astype(np.float64)
    last = off[1:] - 1
    assert (ids[last] == -1).all()  # the last row of each document predicts nothing
    body = np.setdiff1d(np.arange(off[-1]), last)
    assert (ids[body, 0] >= 0).all() and ids.max() < smollm2_view.vocab_size
    np.testing.assert_allclose(probs[body].sum(1), 1.0, atol=3e-3)
    tgt_input = np.asarray(tgt["input_ids"]).astype(np.int64)
    checked = 0
    for d in np.flatnonzero(fused["choice"] == 1):
        rows = np.arange(off[d], off[d + 1] - 1)
        fallback = rows[np.asarray(aligned["aligned"])[rows] == 0]
        # The source's unaligned rows are one-hot on the NEXT target token (defect 1 stays fixed).
        np.testing.assert_array_equal(ids[fallback, 0], tgt_input[fallback + 1])
        np.testing.assert_allclose(probs[fallback, 0], 1.0)
        checked += len(fallback)
    assert checked > 0

    avg = fuse_shard(tgt, [aligned], "avgCE", "token", "byte")
    assert avg["target_ids"].shape == (off[-1], 10)
    np.testing.assert_allclose(avg["target_probs"][body].astype(np.float64).sum(1), 1.0, atol=3e-3)

    # Fusing block by block (as for shards of millions of rows) changes nothing.
    import fusion.fuse as fuse_mod

    monkeypatch.setattr(fuse_mod, "_BLOCK_ROWS", 7)
    for args, whole in ((("minCE", "sequence", "byte"), fused), (("avgCE", "token", "byte"), avg)):
        blocked = fuse_shard(tgt, [aligned], *args)
        for name in whole:
            np.testing.assert_array_equal(blocked[name], whole[name])


def test_deciding_on_the_targets_tokens_as_fused(case) -> None:
    """ceOn target: each candidate's CE on the target's gold tokens as it would be fused. Row 0's gold (the
    target's next token 11, 2 bytes) gets q 0.75 from the target and nothing from the source (charged the
    1e-4 floor): per byte 0.2075 against 6.644 bits on the one row both have, so MinCE keeps the target,
    where the source's own-tokenization CE (0.541 vs 0.721 bits/byte) picked the source."""
    target, source = case
    own = fuse_shard(target, [source], "minCE", "sequence", "byte")
    fused_view = fuse_shard(target, [source], "minCE", "sequence", "byte", ce_on="target")
    assert own["choice"].tolist() == [1] and fused_view["choice"].tolist() == [0]
    assert fused_view["target_ids"].tolist() == [[11, 20], [12, 21], [-1, -1]]
    per_row = fuse_shard(target, [source], "minCE", "token", "byte", ce_on="target")
    assert per_row["choice"].tolist() == [0, 0, 0]  # row 1: the source has no distribution of its own


def test_the_target_stands_in_where_a_source_has_no_distribution(case) -> None:
    """fallback target: the source picked for the document contributes its own row 0 and the target's row 1
    (unaligned there: one-hot on 12 before); the last row stays empty."""
    target, source = case
    onehot = fuse_shard(target, [source], "minCE", "sequence", "byte")
    standin = fuse_shard(target, [source], "minCE", "sequence", "byte", fallback="target")
    assert onehot["target_ids"].tolist() == [[20, 30], [12, -1], [-1, -1]]
    assert standin["choice"].tolist() == [1]
    assert standin["target_ids"].tolist() == [[20, 30], [12, 21], [-1, -1]]
    np.testing.assert_allclose(
        standin["target_probs"].astype(float), [[0.5, 0.5], [2 / 3, 1 / 3], [0, 0]], atol=1e-3
    )
    # Both: the CE is taken on rows 0 and 1 (the source has the target's row 1), per byte over 2 + 1 bytes:
    # target (0.41504 + 0.58496) / 3 = 1/3 against (13.2877 + 0.58496) / 3 = 4.62 for the source.
    both = fuse_shard(target, [source], "minCE", "sequence", "byte", ce_on="target", fallback="target")
    assert both["choice"].tolist() == [0]
    with pytest.raises(FusionError, match="ceOn 'own' / fallback 'zero'"):
        fuse_shard(target, [source], fallback="zero")


def test_fused_view_ce_values(case) -> None:
    from fusion.fuse import _candidates, fused_view_ce

    target, source = case
    cands = _candidates(target, [source], True, None, "onehot")
    ce, per_document = fused_view_ce(cands, target, 1.0, "byte", "sequence")
    assert per_document is None
    np.testing.assert_allclose(ce[:, 0], [-math.log2(0.75) / 2, -math.log2(1e-4) / 2], rtol=1e-3)
    per_row, has = fused_view_ce(cands, target, 1.0, "token", "token")  # nats per token
    np.testing.assert_allclose(per_row[:, 0], [-math.log(0.75), -math.log(1e-4)], rtol=1e-3)
    assert has.tolist() == [[True, True, False], [True, False, False]]
