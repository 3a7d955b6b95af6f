"""fusion.tokens: every token as the bytes it stands for (defect 8), on real tokenizers of three families."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest

from fusion.tokens import (
    BYTE_TO_UNICODE,
    TokenizerSchemeError,
    TokenizerView,
    adds_bos_by_default,
    build_view,
    encode_documents,
)


def _bytes_of(tok, view: TokenizerView, piece: str) -> bytes:
    return view.token_bytes[tok.convert_tokens_to_ids(piece)]


def test_gpt2_byte_alphabet():
    assert len(set(BYTE_TO_UNICODE)) == 256
    assert [BYTE_TO_UNICODE[ord(c)] for c in " \n\t"] == ["Ġ", "Ċ", "ĉ"]
    assert BYTE_TO_UNICODE[ord("A")] == "A"
    assert (BYTE_TO_UNICODE[0xC3], BYTE_TO_UNICODE[0xA9]) == ("Ã", "©")


def test_byte_level_bpe_tokens_are_their_bytes(smollm2_tokenizer, smollm2_view):
    tok, view = smollm2_tokenizer, smollm2_view
    assert (view.kind, view.marker) == ("byte_level", "Ġ")
    assert _bytes_of(tok, view, "Ċ") == b"\n"
    assert _bytes_of(tok, view, "ĉ") == b"\t"
    assert _bytes_of(tok, view, "Ã©") == "é".encode()
    assert _bytes_of(tok, view, "Ġthe") == b" the"
    assert _bytes_of(tok, view, "ĠĠĠ") == b"   "
    assert _bytes_of(tok, view, "<|im_end|>") == b""  # special: stands for no text


def test_sentencepiece_tokens_are_their_bytes(mistral_tokenizer, mistral_view):
    tok, view = mistral_tokenizer, mistral_view
    assert (view.kind, view.marker) == ("sentencepiece", "▁")
    assert _bytes_of(tok, view, "<0x0A>") == b"\n"
    assert _bytes_of(tok, view, "<0x09>") == b"\t"
    assert _bytes_of(tok, view, "<0xC3>") == b"\xc3"
    assert _bytes_of(tok, view, "▁the") == b" the"
    assert _bytes_of(tok, view, "▁") == b" "
    assert _bytes_of(tok, view, "▁▁▁") == b"   "
    assert _bytes_of(tok, view, "é") == "é".encode()
    assert [view.token_bytes[i] for i in (0, 1, 2)] == [b"", b"", b""]  # <unk> <s> </s>
    assert view.byte_fallback.sum() == 256 and view.byte_fallback[3:259].all()


def test_tiktoken_qwen_tokens_are_their_bytes(qwen_tokenizer, qwen_view):
    tok, view = qwen_tokenizer, qwen_view
    assert (view.kind, view.marker) == ("byte_level", "Ġ")
    assert _bytes_of(tok, view, "Ċ") == b"\n"
    assert _bytes_of(tok, view, "ĠcafÃ©") == " café".encode()
    assert view.token_bytes[151643:] == [b"", b"", b""]


def test_view_sizes_follow_len_tokenizer_not_the_model_config(qwen_view, mistral_view, smollm2_view):
    # Qwen's model config says 151,936 (padded): the view has one entry per real token id (defect 7).
    assert (qwen_view.vocab_size, mistral_view.vocab_size, smollm2_view.vocab_size) == (151646, 32000, 49152)
    for view in (qwen_view, mistral_view, smollm2_view):
        assert len(view.token_bytes) == view.vocab_size == len(view.nbytes)
        assert view.nbytes.dtype == np.uint16
        assert np.array_equal(view.nbytes, [len(b) for b in view.token_bytes])
        assert view.nbytes[view.special_ids].sum() == 0
        assert view.eos_id in view.special_ids


def test_special_ids_and_eos(smollm2_view, mistral_view, qwen_view):
    assert mistral_view.special_ids.tolist() == [0, 1, 2] and mistral_view.eos_id == 2
    assert qwen_view.special_ids.tolist() == [151643, 151644, 151645] and qwen_view.eos_id == 151643
    assert smollm2_view.eos_id == 2 and smollm2_view.special_ids.tolist()[:3] == [0, 1, 2]


def test_views_are_cached_per_tokenizer_object(mistral_tokenizer, mistral_view):
    assert TokenizerView.from_tokenizer(mistral_tokenizer) is mistral_view
    fresh = build_view(mistral_tokenizer)
    assert fresh is not mistral_view and fresh.fingerprint() == mistral_view.fingerprint()


@pytest.mark.parametrize("family", ["smollm2", "qwen", "mistral"])
def test_decoded_tokens_give_back_the_text(family, request):
    tok = request.getfixturevalue(f"{family}_tokenizer")
    view = request.getfixturevalue(f"{family}_view")
    text = inspect.getsource(json)[:5000] + "\n\tnaïve café – 東京 😀 1234\r\n"
    (ids,) = encode_documents(tok, [text])
    # SentencePiece prepends one space to a text not starting with one (its dummy prefix).
    expected = (b" " if view.kind == "sentencepiece" else b"") + text.encode()
    assert view.decode(ids) == expected  # the trailing EOS adds nothing
    assert int(view.nbytes[ids].sum()) == len(expected)


def test_sentencepiece_dummy_prefix_only_where_the_text_lacks_a_space(mistral_tokenizer, mistral_view):
    decoded = [mistral_view.decode(d) for d in encode_documents(mistral_tokenizer, ["x", " x", "\nx"])]
    assert decoded == [b" x", b" x", b" \nx"]


def test_encode_documents_appends_eos_and_no_bos(mistral_tokenizer, smollm2_tokenizer):
    docs = encode_documents(mistral_tokenizer, ["Hello world", "a"])
    assert [d.tolist() for d in docs] == [[22557, 1526, 2], [264, 2]]
    assert all(d.dtype == np.int32 for d in docs)
    (doc,) = encode_documents(smollm2_tokenizer, ["Hello world"])
    assert doc.tolist() == [19556, 905, 2]


def test_add_bos_follows_each_tokenizers_own_default(mistral_tokenizer, smollm2_tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # SmolLM2's byte-level BPE encodes without BOS; a Gemma/Llama-style tokenizer whose post-processor
    # prepends <s> does (the check reads the tokenizer's behaviour, not its class).
    assert adds_bos_by_default(smollm2_tokenizer) is False
    raw = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "a": 2, "[UNK]": 3}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    with_bos = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    assert adds_bos_by_default(with_bos) is True
    docs = encode_documents(mistral_tokenizer, ["Hello world", "a"], add_bos=True)
    assert [d.tolist() for d in docs] == [[1, 22557, 1526, 2], [1, 264, 2]]


def test_special_token_text_in_a_document_stays_text(
    qwen_tokenizer, qwen_view, mistral_tokenizer, mistral_view
):
    (ids,) = encode_documents(qwen_tokenizer, ["a<|endoftext|>b"])
    assert ids.tolist().count(151643) == 1 and ids[-1] == 151643  # only the EOS we append
    assert qwen_view.decode(ids) == b"a<|endoftext|>b"
    (ids,) = encode_documents(mistral_tokenizer, ["a</s><s>b"])
    assert not set(ids[:-1].tolist()) & {0, 1, 2} and ids[-1] == 2
    assert mistral_view.decode(ids) == b" a</s><s>b"


def test_empty_text_is_refused_naming_the_document(mistral_tokenizer):
    with pytest.raises(ValueError, match="document 1: empty text"):
        encode_documents(mistral_tokenizer, ["fine", ""])
    with pytest.raises(TypeError, match="list of texts"):
        encode_documents(mistral_tokenizer, "just a string")


def _word_level_tokenizer(eos: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"hello": 0, "world": 1, "[UNK]": 2, "[EOS]": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token=eos)
    tok.name_or_path = "word-level-test"
    return tok


def test_tokenizer_without_markers_is_refused_clearly():
    with pytest.raises(
        TokenizerSchemeError,
        match=(
            r"tokenizer word-level-test: cannot tell how tokens map to text: no 'Ġ' byte-level alphabet "
            r".* and no '▁' markers"
        ),
    ):
        build_view(_word_level_tokenizer("[EOS]"))


def test_tokenizer_without_eos_is_refused():
    with pytest.raises(TokenizerSchemeError, match="word-level-test: has no EOS token"):
        build_view(_word_level_tokenizer(None))
    with pytest.raises(TokenizerSchemeError, match="no EOS token"):
        encode_documents(_word_level_tokenizer(None), ["hello"])


def test_hand_made_view():
    view = TokenizerView.from_token_bytes("hand", [b"<eos>", b"a", b" b", b"\n"], eos_id=0)
    assert view.token_bytes == [b"", b"a", b" b", b"\n"]
    assert view.nbytes.tolist() == [0, 1, 2, 1]
    assert view.token_text == ["", "a", " b", "\n"]
    assert view.decode([1, 2, 3, 0]) == b"a b\n"
    assert view.bytes_of([3]) == [b"\n"]
