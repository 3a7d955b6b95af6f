"""fusion.project: source ids projected onto the target vocabulary by what they spell, on real tokenizers
(SmolLM2 byte-level BPE, Mistral SentencePiece, Qwen tiktoken) with hand-picked tokens, and duplicates summed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fusion.project import (
    BYTE,
    EOS,
    MODES,
    NO_BYTE_TOKEN,
    SPECIAL,
    TEXT,
    Projection,
    ProjectionError,
    StaleProjectionError,
    build_projection,
    encoders,
    ensure_projection,
    extend_projection,
    mode_index,
    sum_duplicates,
)
from fusion.tokens import TokenizerSchemeError, TokenizerView

NEG = -np.inf
INSIDE, TGT_START, SRC_START = 0, 1, 2  # mode_index(src_at_start, tgt_at_start)


def test_mode_index():
    assert mode_index([0, 0, 1, 1], [0, 1, 0, 1]).tolist() == [0, 1, 2, 3]
    assert (mode_index(0, 0), mode_index(0, 1), mode_index(1, 0)) == (INSIDE, TGT_START, SRC_START)


# ------------------------------------------------------------------------------------------------
# Hand-picked tokens


def _ids(tok, pieces: list[str]) -> list[int]:
    ids = tok.convert_tokens_to_ids(pieces)
    assert None not in ids and tok.unk_token_id not in ids, pieces
    return ids


@pytest.fixture(scope="module")
def smollm2_to_mistral(smollm2_tokenizer, mistral_tokenizer):
    return build_projection(smollm2_tokenizer, mistral_tokenizer)


def test_smollm2_onto_mistral(smollm2_to_mistral, smollm2_tokenizer, mistral_tokenizer):
    proj = smollm2_to_mistral
    pickle, nl, zh, sp_e2, hello, one, im_start, im_end = _ids(
        smollm2_tokenizer, ["Ġpickle", "Ċ", "ä½", "Ġâ", "Hello", "1", "<|im_start|>", "<|im_end|>"]
    )
    assert smollm2_tokenizer.eos_token_id == im_end
    t_pick, t_nl, t_space, t_e4, t_hello, t_Hello, t_one, t_eos = _ids(
        mistral_tokenizer, ["▁pick", "<0x0A>", "▁", "<0xE4>", "Hello", "▁Hello", "1", "</s>"]
    )
    # ' pickle' is '▁pick' + 'le' for Mistral (no '▁pickle' piece): the first token is '▁pick'.
    assert mistral_tokenizer(" pickle", add_special_tokens=False)["input_ids"][0] == t_pick
    assert proj.ids[:, pickle].tolist() == [t_pick] * MODES
    # '\n' inside a document is the byte token <0x0A>; at a document start Mistral first writes its
    # dummy prefix as a lone '▁' (mode 1: the target's dummy is pending).
    assert proj.ids[INSIDE, nl] == t_nl and proj.ids[TGT_START, nl] == t_space
    # 'Hello' inside a document gets no dummy prefix; at a document start it does.
    assert (proj.ids[INSIDE, hello], proj.ids[TGT_START, hello]) == (t_hello, t_Hello)
    assert (proj.ids[INSIDE, one], proj.ids[TGT_START, one]) == (t_one, t_space)
    # A partial character (b'\xe4\xbd') -> the byte-fallback token of its first byte.
    assert proj.ids[INSIDE, zh] == t_e4 and proj.outcome[zh] == BYTE
    # b' \xe2': the valid head ' ' is encoded -> '▁'.
    assert proj.ids[INSIDE, sp_e2] == t_space and proj.outcome[sp_e2] == TEXT
    # Special tokens: EOS by role, the others dropped.
    assert proj.ids[:, im_end].tolist() == [t_eos] * MODES and proj.outcome[im_end] == EOS
    assert proj.ids[:, im_start].tolist() == [-1] * MODES and proj.outcome[im_start] == SPECIAL
    # SmolLM2 never has a dummy prefix, so the source-at-start modes equal the others.
    assert not proj.src_dummy and proj.tgt_dummy
    np.testing.assert_array_equal(proj.ids[SRC_START], proj.ids[INSIDE])


def test_mistral_onto_smollm2(mistral_tokenizer, smollm2_tokenizer):
    m_nl, m_e4, m_c0, m_hello, m_space, m_bos, m_eos = _ids(
        mistral_tokenizer, ["<0x0A>", "<0xE4>", "<0xC0>", "▁Hello", "▁", "<s>", "</s>"]
    )
    proj = build_projection(
        mistral_tokenizer, smollm2_tokenizer, [m_nl, m_e4, m_c0, m_hello, m_space, m_bos, m_eos]
    )
    s_nl, s_e4, s_Ghello, s_hello, s_space = _ids(smollm2_tokenizer, ["Ċ", "ä", "ĠHello", "Hello", "Ġ"])
    assert proj.src_dummy and not proj.tgt_dummy
    assert proj.ids[INSIDE, m_nl] == s_nl  # byte fallback '\n' is plain text for the target
    assert proj.ids[INSIDE, m_e4] == s_e4 and proj.outcome[m_e4] == BYTE  # 'ä' is SmolLM2's byte 0xE4
    # SmolLM2 has no token for byte 0xC0 (never in UTF-8): dropped and counted.
    assert "À" not in smollm2_tokenizer.get_vocab()
    assert proj.ids[INSIDE, m_c0] == -1 and proj.outcome[m_c0] == NO_BYTE_TOKEN
    # '▁Hello' spells ' Hello' inside a document; at the source's document start its '▁' is the dummy.
    assert (proj.ids[INSIDE, m_hello], proj.ids[SRC_START, m_hello]) == (s_Ghello, s_hello)
    # A lone '▁' at the source's start is only the dummy: no text, dropped.
    assert (proj.ids[INSIDE, m_space], proj.ids[SRC_START, m_space]) == (s_space, -1)
    assert proj.ids[INSIDE, m_bos] == -1 and proj.ids[INSIDE, m_eos] == smollm2_tokenizer.eos_token_id
    # Lazy: nothing else computed.
    assert int(proj.computed.sum()) == 7 and proj.ids[INSIDE, 100] == -1


def test_smollm2_onto_qwen(smollm2_tokenizer, qwen_tokenizer):
    pickle, nl, zh = _ids(smollm2_tokenizer, ["Ġpickle", "Ċ", "ä½"])
    proj = build_projection(smollm2_tokenizer, qwen_tokenizer, [pickle, nl, zh])
    assert not proj.tgt_dummy
    assert proj.ids[:, [pickle, nl, zh]].tolist() == [_ids(qwen_tokenizer, ["Ġpickle", "Ċ", "ä"])] * MODES


# ------------------------------------------------------------------------------------------------
# Summing duplicates


def test_sum_duplicates_hand_computed():
    ids = np.array([[5, 7, 5, -1], [3, 3, 3, 9], [4, -1, 4, 2], [-1, -1, -1, -1], [8, 6, 6, 8]])
    lp = np.log(
        np.array(
            [
                [0.5, 0.25, 0.125, 0.1],  # 5: 0.625, 7: 0.25; the empty slot's probability is ignored
                [0.25, 0.25, 0.25, 0.125],  # 3: 0.75, 9: 0.125
                [0.125, 0.5, 0.0625, 0.5],  # 4: 0.1875 < 2: 0.5
                [0.5, 0.5, 0.5, 0.5],
                [0.25, 0.25, 0.25, 0.25],  # 8: 0.5 and 6: 0.5 tie: the source's order (8 first)
            ]
        )
    )
    lp[2, 1] = np.nan  # no entry either way
    got_ids, got_lp = sum_duplicates(ids, lp)
    assert got_ids.tolist() == [[5, 7, -1, -1], [3, 9, -1, -1], [2, 4, -1, -1], [-1] * 4, [8, 6, -1, -1]]
    assert got_ids.dtype == np.int32 and got_lp.dtype == np.float32
    expected = [[0.625, 0.25, 0, 0], [0.75, 0.125, 0, 0], [0.5, 0.1875, 0, 0], [0] * 4, [0.5, 0.5, 0, 0]]
    np.testing.assert_allclose(np.exp(got_lp.astype(np.float64)), expected, rtol=1e-6)


def test_sum_duplicates_clips_mass_above_one_and_skips_zero_probability():
    ids = np.array([[1, 1, 2]])
    lp = np.array([[math.log(0.6), math.log(0.45), -np.inf]], dtype=np.float32)
    got_ids, got_lp = sum_duplicates(ids, lp)
    assert got_ids.tolist() == [[1, -1, -1]] and got_lp[0, 0] == 0.0


def test_duplicates_of_a_real_projection_are_summed(smollm2_to_mistral, smollm2_tokenizer, mistral_tokenizer):
    # 'Ġpick' and 'Ġpickle' both start with '▁pick'; 'Ċ' and 'ĊĊ' both with <0x0A>.
    src = np.array([_ids(smollm2_tokenizer, ["Ċ", "Ġpickle", "ĊĊ", "Ġpick"])])
    lp = np.log(np.array([[0.5, 0.125, 0.25, 0.0625]])).astype(np.float16)
    ids, got = sum_duplicates(smollm2_to_mistral.lookup(src, np.array([INSIDE])), lp)
    assert ids.tolist() == [[*_ids(mistral_tokenizer, ["<0x0A>", "▁pick"]), -1, -1]]
    np.testing.assert_allclose(np.exp(got[0, :2].astype(np.float64)), [0.75, 0.1875], rtol=2e-3)


# ------------------------------------------------------------------------------------------------
# Lazy building, save / load


def test_extend_save_load_and_stale_checks(
    tmp_path, smollm2_tokenizer, mistral_tokenizer, smollm2_to_mistral
):
    smollm2 = TokenizerView.from_tokenizer(smollm2_tokenizer)
    mistral = TokenizerView.from_tokenizer(mistral_tokenizer)
    lazy = build_projection(smollm2_tokenizer, mistral_tokenizer, [19893, 198])
    assert lazy.missing(np.array([198, 30, -1, 30])).tolist() == [30]
    more = extend_projection(lazy, smollm2_tokenizer, mistral_tokenizer, np.array([30, 2, 1]))
    assert int(lazy.computed.sum()) == 2 and int(more.computed.sum()) == 5  # the original is untouched
    done = [1, 2, 30, 198, 19893]
    np.testing.assert_array_equal(more.ids[:, done], smollm2_to_mistral.ids[:, done])
    path = tmp_path / "projection.npz"
    more.save(path)
    back = Projection.load(path, smollm2, mistral)
    np.testing.assert_array_equal(back.ids, more.ids)
    np.testing.assert_array_equal(back.outcome, more.outcome)
    assert (back.src_dummy, back.tgt_dummy, back.tgt_rules) == (False, True, more.tgt_rules)
    with pytest.raises(StaleProjectionError, match="another target tokenizer"):
        Projection.load(path, smollm2, smollm2)
    with pytest.raises(StaleProjectionError, match="another source vocabulary"):
        back.check(mistral, mistral)
    with pytest.raises(ValueError, match="outside the source vocabulary"):
        extend_projection(more, smollm2_tokenizer, mistral_tokenizer, np.array([10**6]))
    # The stage's cache: reused when it covers the ids, extended when not, rebuilt when stale.
    assert ensure_projection(back, smollm2_tokenizer, mistral_tokenizer, [30, 198])[1] == "reused"
    grown, how = ensure_projection(back, smollm2_tokenizer, mistral_tokenizer, [905])
    assert how == "extended" and grown.ids[INSIDE, 905] == smollm2_to_mistral.ids[INSIDE, 905]
    stale = build_projection(smollm2_tokenizer, smollm2_tokenizer, [30])
    assert ensure_projection(stale, smollm2_tokenizer, mistral_tokenizer, [30])[1] == "built"
    path.write_bytes(b"not a zip")
    with pytest.raises(StaleProjectionError, match="not a readable projection"):
        Projection.load(path)
    with pytest.raises(FileNotFoundError, match="build_projection"):
        Projection.load(tmp_path / "none.npz")


# ------------------------------------------------------------------------------------------------
# Hand-made tokenizers: a Llama-2 style Prepend normalizer, one whose dummy cannot be disabled, WordPiece


def _spm_like(normalizer) -> object:
    """A SentencePiece-like fast tokenizer: byte fallback, '▁' pieces, the given normalizer."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", "a", "b", "▁a", "▁b", "ab"]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = [("▁", "a"), ("▁", "b"), ("a", "b")]
    backend = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizer
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_prepend_normalizer_is_removed_inside_documents(smollm2_tokenizer):
    from tokenizers import normalizers

    tok = _spm_like(normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]))
    view = TokenizerView.from_tokenizer(tok)
    enc = encoders(tok, view)
    assert enc.dummy
    assert enc.start.encode("ab", add_special_tokens=False).tokens == ["▁a", "b"]
    assert enc.inside.encode("ab", add_special_tokens=False).tokens == ["ab"]
    assert tok.backend_tokenizer.encode("ab", add_special_tokens=False).tokens == ["▁a", "b"]  # untouched
    ab, gb = _ids(smollm2_tokenizer, ["ab", "Ġb"])
    proj = build_projection(smollm2_tokenizer, tok, [ab, gb])
    assert proj.ids[[INSIDE, TGT_START], ab].tolist() == _ids(tok, ["ab", "▁a"])
    assert proj.ids[INSIDE, gb] == tok.convert_tokens_to_ids("▁b")


def test_a_dummy_prefix_that_cannot_be_disabled_is_refused(smollm2_tokenizer):
    from tokenizers import Regex, normalizers

    tok = _spm_like(normalizers.Replace(Regex("^"), "▁"))
    with pytest.raises(ProjectionError, match=r"cannot encode text inside a document: 'a' encodes to b' a'"):
        build_projection(smollm2_tokenizer, tok, [30])


def test_a_tokenizer_without_byte_spelling_is_refused(smollm2_tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[SEP]": 1, "play": 2, "##ing": 3, "##ed": 4, "the": 5}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="[SEP]", unk_token="[UNK]")
    with pytest.raises(TokenizerSchemeError, match="cannot tell how tokens map to text"):
        build_projection(smollm2_tokenizer, tok, [30])
