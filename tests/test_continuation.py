"""fusion.continuation: a source token whose continuations the target spells as longer tokens shares its
probability among them (hand-computed rows on hand-made vocabularies, then through exact alignment on real
tokenizers, where the source's own tokenizer decides what continues what)."""

from __future__ import annotations

import numpy as np
import pytest

from fusion.align import needed_source_ids
from fusion.continuation import first_source_tokens, split_by_target
from fusion.exact import align_shard_exact
from fusion.project import build_projection, sum_duplicates
from fusion.tokens import encode_documents
from tests.test_exact import extract_arrays, shard, text_arrays

# Target ids: 1 ' re', 2 ' return', 3 ' result', 4 ' x', 5 ' r'.
# Source ids: 1 ' re', 2 ' x', 3 ' y', 4 ' return'.
SPELLED = np.array([-1, 1, 4, -1, 2])  # source id -> the target id that spells it (' y': none)
# Target id -> the source id the source tokenizer emits first for its text: ' return' is a source token
# itself, ' result' is ' re' + 'sult'; ' r' has no source token of its own (-1).
FIRST = np.array([-1, 1, 4, 1, 2, -1])
FIRST_WITHOUT_RETURN = np.array([-1, 1, 1, 1, 2, -1])  # a source that spells ' return' as ' re' + 'turn'


def split(src_row, src_p, tgt_row, tgt_p, first=FIRST, rows=None):
    """Rows through split_by_target and sum_duplicates -> {target id: probability} per row."""
    src_ids, tgt_ids = np.array(src_row, ndmin=2), np.array(tgt_row, ndmin=2)
    with np.errstate(divide="ignore"):
        src_lp, tgt_lp = np.log(np.array(src_p, ndmin=2)), np.log(np.array(tgt_p, ndmin=2))
    proj = np.where(src_ids >= 0, SPELLED[np.maximum(src_ids, 0)], -1)
    ids, lp = sum_duplicates(*split_by_target(proj, src_ids, src_lp, tgt_ids, tgt_lp, first, rows))
    return [
        {int(i): round(float(np.exp(v)), 6) for i, v in zip(r_ids, r_lp, strict=True) if i >= 0}
        for r_ids, r_lp in zip(ids, lp, strict=True)
    ]


def test_a_source_token_is_split_among_the_target_tokens_that_continue_it() -> None:
    # ' re' 0.6; the target continues it with ' return' 0.3 and ' result' 0.1 -> 0.45 and 0.15; ' x' stays.
    (row,) = split([1, 2], [0.6, 0.3], [2, 3, 4], [0.3, 0.1, 0.5], FIRST_WITHOUT_RETURN)
    assert row == {2: 0.45, 3: 0.15, 4: 0.3}


def test_what_the_source_spells_itself_is_not_a_continuation() -> None:
    # This source has ' return': its p(' re') means "not ' return'", so only ' result' continues ' re'.
    (row,) = split([1, 4, 2], [0.6, 0.2, 0.1], [2, 3, 4], [0.3, 0.1, 0.5])
    assert row == {3: 0.6, 2: 0.2, 4: 0.1}


def test_the_spelled_token_takes_its_share_when_the_target_holds_it() -> None:
    # The target holds ' re' itself (0.1) beside ' return' (0.3): 0.6 splits 1:3.
    (row,) = split([1], [0.6], [1, 2], [0.1, 0.3], FIRST_WITHOUT_RETURN)
    assert row == {1: 0.15, 2: 0.45}


def test_entries_nothing_continues_keep_their_spelling() -> None:
    # ' r' (shorter) and ' x' do not continue ' re': unchanged.
    (row,) = split([1, 2], [0.6, 0.3], [5, 4], [0.5, 0.4])
    assert row == {1: 0.6, 4: 0.3}
    # An entry the projection dropped (' y') carries nothing, even where the target row holds tokens.
    (row,) = split([3, 4], [0.5, 0.2], [2], [0.9])
    assert row == {2: 0.2}


def test_rows_not_allowed_and_empty_target_rows_are_left_alone() -> None:
    src, p = [[1, 2], [1, 2]], [[0.6, 0.3], [0.6, 0.3]]
    rows = split(src, p, [[2, 3], [2, 3]], [[0.3, 0.1]] * 2, FIRST_WITHOUT_RETURN, np.array([False, True]))
    assert rows == [{1: 0.6, 4: 0.3}, {2: 0.45, 3: 0.15, 4: 0.3}]
    (row,) = split([1, 2], [0.6, 0.3], [-1, -1], [0.0, 0.0], FIRST_WITHOUT_RETURN)
    assert row == {1: 0.6, 4: 0.3}


def test_mass_is_conserved_on_random_rows() -> None:
    rng = np.random.default_rng(0)
    n = 5000
    src_ids = rng.integers(1, 5, size=(n, 4))
    tgt_ids = rng.integers(1, 6, size=(n, 3))
    src_p = rng.dirichlet(np.ones(4), size=n) * 0.9
    tgt_p = rng.dirichlet(np.ones(3), size=n) * 0.8
    proj = SPELLED[src_ids]
    ids, lp = split_by_target(proj, src_ids, np.log(src_p), tgt_ids, np.log(tgt_p), FIRST_WITHOUT_RETURN)
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
    # Source Mistral (' railroad' is '▁rail' + 'road'; '▁railway' is its own token; ' rails' starts '▁r'),
    # target SmolLM2 (' railroad', ' railway', ' rails' are single tokens).
    text = "we railroad it"
    (src_doc,) = encode_documents(mistral_tokenizer, [text])
    (tgt_doc,) = encode_documents(smollm2_tokenizer, [text])
    s_id, t_id = mistral_tokenizer.convert_tokens_to_ids, smollm2_tokenizer.convert_tokens_to_ids
    assert mistral_tokenizer.convert_ids_to_tokens(src_doc.tolist())[:3] == ["▁we", "▁rail", "road"]
    assert smollm2_tokenizer.convert_ids_to_tokens(tgt_doc.tolist())[:2] == ["we", "Ġrailroad"]
    # Row 0 (after 'we'): Mistral says '▁rail' 0.5, '▁railway' 0.1, '▁it' 0.25; SmolLM2's own row holds
    # ' railroad' 0.3, ' railway' 0.1, ' rails' 0.05, ' it' 0.2 (not ' rail').
    src_row = ([s_id("▁rail"), s_id("▁railway"), s_id("▁it")], np.log([0.5, 0.1, 0.25]))
    tgt_row = ([t_id(t) for t in ("Ġrailroad", "Ġrailway", "Ġrails", "Ġit")], np.log([0.3, 0.1, 0.05, 0.2]))
    src = shard(tmp_path, "src", extract_arrays([src_doc], mistral_view, [0], {0: src_row}, k=3))
    tgt = shard(tmp_path, "tgt", extract_arrays([tgt_doc], smollm2_view, [0], {0: tgt_row}, k=4))
    proj = build_projection(mistral_tokenizer, smollm2_tokenizer, needed_source_ids(src))
    first = first_source_tokens(mistral_tokenizer, smollm2_tokenizer, needed_source_ids(tgt))
    assert first[t_id("Ġrailroad")] == s_id("▁rail") and first[t_id("Ġrails")] == s_id("▁r")
    out, _ = align_shard_exact(
        src,
        tgt,
        mistral_view,
        smollm2_view,
        proj,
        *text_arrays([text]),
        first_source=first if continuation else None,
    )
    got = {
        int(i): round(float(np.exp(v)), 3)
        for i, v in zip(out["topk_ids"][0], out["topk_logprobs"][0].astype(float), strict=True)
        if i >= 0 and v > -20
    }
    if continuation:  # only ' railroad' continues '▁rail' ('▁railway' is Mistral's own; ' rails' starts '▁r')
        assert got == {t_id("Ġrailroad"): 0.5, t_id("Ġit"): 0.25, t_id("Ġrailway"): 0.1}
    else:  # '▁rail' spells ' rail', which the target's row does not even hold
        assert got == {t_id("Ġrail"): 0.5, t_id("Ġit"): 0.25, t_id("Ġrailway"): 0.1}
