"""fusion.vocab: MinED / EM maps over decoded bytes, with hand-computed answers and deterministic ties."""

from __future__ import annotations

import numpy as np
import pytest

from bench.reference import levenshtein
from fusion.tokens import TokenizerView, build_view
from fusion.vocab import (
    StaleVocabMapError,
    VocabMap,
    build_vocab_map,
    extend_vocab_map,
    target_candidates,
)

# Source (byte-level): 0 EOS; 6 a special '<pad>'; 5 an empty, non-special token.
SRC = TokenizerView.from_token_bytes(
    "hand-src",
    [b"<eos>", b"cat", b" dog", b"xyz", b"a", b"", b"<pad>", b"\n\n", b"b"],
    eos_id=0,
    special_ids=[6],
)
# Target (SentencePiece-like): 3 and 4 are byte-fallback tokens; 'cat' twice; 'a' both as byte and token.
TGT = TokenizerView.from_token_bytes(
    "hand-tgt",
    [b"<unk>", b"</s>", b"<pad>", b"a", b"\n", b"cat", b"cat", b" do", b" dig", b"xy", b"yz", b"a", b"zzz"],
    eos_id=1,
    special_ids=[0, 2],
    kind="sentencepiece",
    byte_fallback=[3, 4],
)

#                  eos  cat  ' dog'  xyz  a   ''  <pad>  \n\n  b
MINED_IDS = [1, 5, 7, 9, 11, -1, 2, 4, 11]
MINED_DIST = [0, 0, 1, 1, 0, -1, 0, 1, 1]
EM_IDS = [1, 5, -1, -1, 11, -1, 2, -1, -1]


def test_candidate_order_puts_emitted_tokens_before_byte_fallback():
    assert target_candidates(TGT).tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 3, 4]


def test_mined_map_on_a_hand_made_vocabulary():
    vmap = build_vocab_map(SRC, TGT, "mined")
    assert vmap.ids.tolist() == MINED_IDS
    assert vmap.distance.tolist() == MINED_DIST
    assert vmap.ids.dtype == np.int32
    # exact: same bytes, or a special token mapped by role (EOS) / by spelling ('<pad>').
    assert vmap.exact.tolist() == [True, True, False, False, True, False, True, False, False]
    assert vmap.computed.all()


def test_ties_go_to_the_lowest_id_and_emitted_tokens_first():
    vmap = build_vocab_map(SRC, TGT, "mined")
    assert vmap.ids[1] == 5  # 'cat' is both 5 and 6
    assert vmap.ids[2] == 7  # ' dog': ' do' (7) and ' dig' (8) both at distance 1
    assert vmap.ids[3] == 9  # 'xyz': 'xy' (9) and 'yz' (10) at distance 1, 'zzz' at 2
    assert vmap.ids[4] == 11  # 'a' is byte token 3 and token 11: 11 is what the tokenizer emits
    assert vmap.ids[8] == 11  # 'b': every 1-byte token is at distance 1; emitted 11 before 3 and 4
    assert vmap.ids[7] == 4  # '\n\n': the byte token is the only one at distance 1, so it wins


def test_em_map_keeps_only_exact_matches():
    vmap = build_vocab_map(SRC, TGT, "em")
    assert vmap.ids.tolist() == EM_IDS
    assert vmap.lookup(np.array([[2, 1], [-1, 4]])).tolist() == [[-1, 5], [-1, 11]]


def test_lookup_exact_only_drops_mined_entries():
    vmap = build_vocab_map(SRC, TGT, "mined")
    assert vmap.lookup(np.array([1, 2, 3, -1]), exact_only=True).tolist() == [5, -1, -1, -1]
    assert vmap.lookup(np.array([1, 2, 3, -1])).tolist() == [5, 7, 9, -1]


def test_lazy_map_computes_only_the_ids_asked_for_and_extends():
    vmap = build_vocab_map(SRC, TGT, "mined", src_ids=np.array([[2, 4], [4, -1]]))
    assert vmap.computed.tolist() == [False, False, True, False, True, False, False, False, False]
    assert vmap.ids.tolist() == [-1, -1, 7, -1, 11, -1, -1, -1, -1]
    assert vmap.missing(np.array([2, 3, 8])).tolist() == [3, 8]
    more = extend_vocab_map(vmap, SRC, TGT, np.array([3, 8]))
    assert more.ids.tolist() == [-1, -1, 7, 9, 11, -1, -1, -1, 11]
    assert vmap.ids[3] == -1  # the original is left alone
    with pytest.raises(ValueError, match="id 9 is outside the source vocabulary of 9 tokens"):
        build_vocab_map(SRC, TGT, src_ids=np.array([9]))


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="alignment method 'fuzzy'"):
        build_vocab_map(SRC, TGT, "fuzzy")


def test_save_load_round_trip_is_atomic_and_checks_vocabularies(tmp_path, mistral_view):
    vmap = build_vocab_map(SRC, TGT, "mined")
    path = tmp_path / "maps" / "vocab-map.npz"
    vmap.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["vocab-map.npz"]  # no partial file left behind
    back = VocabMap.load(path, SRC, TGT)
    for name in ("ids", "exact", "computed", "distance"):
        assert np.array_equal(getattr(back, name), getattr(vmap, name))
    assert back.method == "mined"
    with pytest.raises(StaleVocabMapError, match="another target vocabulary than pkg://mistral_common"):
        VocabMap.load(path, SRC, mistral_view)
    with pytest.raises(StaleVocabMapError, match="another source vocabulary"):
        VocabMap.load(path, TGT, TGT)
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(StaleVocabMapError, match="not a readable vocabulary map"):
        VocabMap.load(path)
    with pytest.raises(FileNotFoundError, match="vocabulary map is missing"):
        VocabMap.load(tmp_path / "none.npz")


def test_smollm2_to_mistral_maps_whitespace_and_bytes_to_the_right_text(
    smollm2_tokenizer, smollm2_view, mistral_tokenizer, mistral_view
):
    """Defect 8: the reference maps 'Ċ' to '▁', 'ĉ' to an unrelated letter, 'Ã©' to '▁©'."""
    pieces = ["Ċ", "ĉ", "Ã©", "ĠÃ©", "Ġ", "Ġthe", "ĠĠĠ", "<|im_end|>"]
    src_ids = smollm2_tokenizer.convert_tokens_to_ids(pieces)
    vmap = build_vocab_map(smollm2_view, mistral_view, "mined", src_ids=np.array(src_ids))
    got = mistral_tokenizer.convert_ids_to_tokens(vmap.ids[src_ids].tolist())
    assert got == ["<0x0A>", "<0x09>", "é", "▁é", "▁", "▁the", "▁▁▁", "</s>"]
    assert vmap.exact[src_ids].all()


def test_mistral_byte_tokens_map_to_the_same_byte_not_to_zero(smollm2_view, mistral_tokenizer, mistral_view):
    byte_ids = np.arange(3, 259)  # <0x00> .. <0xFF>
    assert mistral_tokenizer.convert_ids_to_tokens([3, 13, 258]) == ["<0x00>", "<0x0A>", "<0xFF>"]
    vmap = build_vocab_map(mistral_view, smollm2_view, "mined", src_ids=byte_ids)
    got = [smollm2_view.token_bytes[i] for i in vmap.ids[byte_ids]]
    has_byte = [bytes([b]) in set(smollm2_view.token_bytes) for b in range(256)]
    # Every byte SmolLM2 has as a token maps onto exactly that byte; the 21 bytes it lacks (never in UTF-8
    # text) map one edit away, onto another single byte, never onto '0' en masse.
    assert sum(has_byte) == 235
    assert all(g == bytes([b]) for b, g in enumerate(got) if has_byte[b])
    assert all(len(g) == 1 for b, g in enumerate(got) if not has_byte[b])
    assert vmap.exact[byte_ids].sum() == 235


def test_real_map_is_reproducible_across_fresh_loads_and_matches_a_plain_oracle(qwen_view, mistral_view):
    from fusion.hub import _load_uncached
    from tests.conftest import MISTRAL_URI, QWEN_URI

    text_ids = np.array([1879, 51950, 15885, 31926, 624, 59565, 88366, 12345, 100000, 151000])
    first = build_vocab_map(qwen_view, mistral_view, "mined", src_ids=text_ids)
    again = build_vocab_map(
        build_view(_load_uncached(QWEN_URI, None)),
        build_view(_load_uncached(MISTRAL_URI, None)),
        "mined",
        src_ids=text_ids,
    )
    assert np.array_equal(first.ids, again.ids) and np.array_equal(first.distance, again.distance)

    # Oracle for the non-exact ones: the first candidate (emitted by ascending id, then byte tokens) at
    # the minimum plain-DP distance. Candidates whose length differs by more than the best distance cannot
    # be closer, so only the rest are checked by the slow oracle.
    cands = target_candidates(mistral_view)
    lengths = mistral_view.nbytes[cands].astype(int)
    non_exact = [i for i in text_ids.tolist() if not first.exact[i]]
    assert len(non_exact) >= 2
    for i in non_exact[:2]:
        q = qwen_view.token_bytes[i]
        chosen = int(first.ids[i])
        d = levenshtein(q, mistral_view.token_bytes[chosen])
        assert d == first.distance[i] > 0
        near = cands[np.abs(lengths - len(q)) <= d]
        dists = np.array([levenshtein(q, mistral_view.token_bytes[c]) for c in near.tolist()])
        assert dists.min() == d
        assert near[np.flatnonzero(dists == d)[0]] == chosen
