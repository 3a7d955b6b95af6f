"""fusion.exact: byte-offset pairing on real tokenizers, checked against an independent spelling of the tokens
(transformers' own byte alphabet / SentencePiece pieces, not fusion.tokens), hand-worked shards, text a
tokenizer normalises, empty documents, bad input, and the DTW methods' diagnostics on the same bound."""

from __future__ import annotations

import glob
import inspect
import itertools
import re
import textwrap

import numpy as np
import pytest

from fusion.align import (
    AlignmentError,
    align_shard,
    align_shard_with_stats,
    needed_source_ids,
)
from fusion.exact import align_shard_exact, align_shard_with_diagnostics, pair_rows
from fusion.format import read_shard, write_shard
from fusion.project import StaleProjectionError, build_projection
from fusion.tokens import TokenizerView, encode_documents
from fusion.vocab import METHODS, build_vocab_map

NEG = -np.inf
BYTE_LEVEL = {"smollm2": True, "qwen": True, "mistral": False}
TRICKY = [
    "def f(x):\n\treturn x  # a tab\n",
    "    indented\n        deeper\n\n\n    back",
    "Emoji 😀🎉 café naïve Ångström",
    "中文文本，日本語のテキスト。한국어",
    "12345 + 678 = 13023; 3.14159",
    " leading space",
    "Hello",
    "tabs\t\tand\r\nCRLF\r\n",
    "a  b   c    d",
]


# ------------------------------------------------------------------------------------------------
# Independent spelling (the test's oracle)


def _gpt2_bytes() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


_BYTE_OF = _gpt2_bytes()
_FALLBACK = re.compile(r"<0x([0-9A-F]{2})>")


def spell(tok, ids, byte_level: bool) -> list[bytes]:
    """The bytes of each token, from the tokenizer's own pieces."""
    specials = set(tok.all_special_ids)
    out = []
    for i, piece in zip(ids, tok.convert_ids_to_tokens([int(i) for i in ids]), strict=True):
        if int(i) in specials:
            out.append(b"")
        elif byte_level:
            out.append(bytes(_BYTE_OF[c] for c in piece))
        elif m := _FALLBACK.fullmatch(piece):
            out.append(bytes([int(m.group(1), 16)]))
        else:
            out.append(piece.replace("▁", " ").encode())
    return out


def prefixes(tok, ids, text: bytes, byte_level: bool) -> list[bytes]:
    """For each row t, the text its tokens 0..t spell (a SentencePiece dummy space removed)."""
    parts = spell(tok, ids, byte_level)
    whole = b"".join(parts)
    dummy = 1 if whole != text and whole == b" " + text else 0
    assert whole[dummy:] == text
    return [p[dummy:] if len(p) > dummy else b"" for p in itertools.accumulate(parts)]


# ------------------------------------------------------------------------------------------------
# Shards


def extract_arrays(docs, view, doc_index, topk=None, k=2) -> dict[str, np.ndarray]:
    """Extract arrays for token ids. Row r's gold_logprob is -r/64 (exact in fp16 below 2048 rows), so an
    aligned row tells which source row it came from. Default top-k: [next gold id, EOS] at [-0.25, -3]."""
    ids = np.concatenate(docs).astype(np.int64)
    n = len(ids)
    assert n < 2048
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    nxt = np.concatenate([np.append(d[1:], d[-1]) for d in docs])
    topk_ids = np.full((n, k), -1, dtype=np.int64)
    topk_lp = np.full((n, k), -np.inf)
    topk_ids[:, :2] = np.stack([nxt, np.full(n, view.eos_id)], axis=1)[:, :k]
    topk_lp[:, :2] = [-0.25, -3.0][:k]
    for row, (i, lp) in (topk or {}).items():
        topk_ids[row], topk_lp[row] = i, lp
    gold = -np.arange(n) / 64
    gold[offsets[1:] - 1] = 0
    return {
        "doc_index": np.asarray(doc_index, dtype=np.int64),
        "doc_offsets": offsets,
        "input_ids": ids.astype(np.int32),
        "token_nbytes": view.nbytes[ids].astype(np.uint16),
        "topk_ids": topk_ids.astype(np.int32),
        "topk_logprobs": topk_lp.astype(np.float16),
        "gold_logprob": gold.astype(np.float16),
        "doc_nll": np.arange(len(docs), dtype=np.float32) + 1.5,
        "doc_pred_nbytes": np.arange(len(docs), dtype=np.int64) + 10,
        "doc_n_pred": np.array([len(d) - 1 for d in docs], dtype=np.int32),
    }


def shard(tmp_path, name, arrays):
    write_shard(tmp_path / f"{name}.safetensors", "extract", arrays)
    return read_shard(tmp_path / f"{name}.safetensors", "extract")


def text_arrays(texts, doc_index=None):
    raw = [t.encode() for t in texts]
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in raw])]).astype(np.int64)
    index = np.arange(len(texts), dtype=np.int64) if doc_index is None else np.asarray(doc_index)
    return np.frombuffer(b"".join(raw), dtype=np.uint8).copy(), offsets, index


@pytest.fixture(scope="module")
def toks(smollm2_tokenizer, mistral_tokenizer, qwen_tokenizer):
    return {"smollm2": smollm2_tokenizer, "mistral": mistral_tokenizer, "qwen": qwen_tokenizer}


def aligned_pair(tmp_path, toks, src_name, tgt_name, texts, src_bos=False, tgt_bos=False, k=2):
    src_tok, tgt_tok = toks[src_name], toks[tgt_name]
    src_view, tgt_view = TokenizerView.from_tokenizer(src_tok), TokenizerView.from_tokenizer(tgt_tok)
    src_docs = encode_documents(src_tok, texts, add_bos=src_bos)
    tgt_docs = encode_documents(tgt_tok, texts, add_bos=tgt_bos)
    index = list(range(len(texts)))
    src = shard(tmp_path, "src", extract_arrays(src_docs, src_view, index, k=k))
    tgt = shard(tmp_path, "tgt", extract_arrays(tgt_docs, tgt_view, index, k=k))
    proj = build_projection(src_tok, tgt_tok, needed_source_ids(src))
    out, diag = align_shard_exact(src, tgt, src_view, tgt_view, proj, *text_arrays(texts))
    return src_docs, tgt_docs, src, tgt, out, diag


def independent_bound(src_tok, tgt_tok, src_docs, tgt_docs, texts, src_bl, tgt_bl):
    """Per target row: the independently spelled prefix; and the set of rows a source prefix also ends at."""
    rows, bound, t0 = {}, set(), 0
    for s_ids, t_ids, text in zip(src_docs, tgt_docs, texts, strict=True):
        s_pre = prefixes(src_tok, s_ids, text.encode(), src_bl)[:-1]  # the last row predicts nothing
        t_pre = prefixes(tgt_tok, t_ids, text.encode(), tgt_bl)[:-1]
        ends = {len(p) for p in s_pre}
        for t, p in enumerate(t_pre):
            rows[t0 + t] = p
            if len(p) in ends:
                bound.add(t0 + t)
        t0 += len(t_ids)
    return rows, bound


# ------------------------------------------------------------------------------------------------
# Pairing on real tokenizers


PAIRS = [
    ("smollm2", False, "mistral", True),
    ("mistral", True, "smollm2", False),
    ("mistral", False, "smollm2", True),
    ("smollm2", False, "qwen", False),
    ("qwen", False, "mistral", False),
]


@pytest.mark.parametrize(("src_name", "src_bos", "tgt_name", "tgt_bos"), PAIRS)
def test_every_transferred_row_has_the_same_preceding_bytes(
    tmp_path, toks, src_name, src_bos, tgt_name, tgt_bos
):
    src_docs, tgt_docs, _, tgt, out, diag = aligned_pair(
        tmp_path, toks, src_name, tgt_name, TRICKY, src_bos, tgt_bos
    )
    src_tok, tgt_tok = toks[src_name], toks[tgt_name]
    src_pre = {}
    s0 = 0
    for ids, text in zip(src_docs, TRICKY, strict=True):
        src_pre.update(enumerate(prefixes(src_tok, ids, text.encode(), BYTE_LEVEL[src_name]), start=s0))
        s0 += len(ids)
    tgt_pre, bound = independent_bound(
        src_tok, tgt_tok, src_docs, tgt_docs, TRICKY, BYTE_LEVEL[src_name], BYTE_LEVEL[tgt_name]
    )
    aligned = np.flatnonzero(out["aligned"]).tolist()
    assert set(aligned) == bound  # coverage is exactly the byte-boundary bound
    for t in aligned:
        s = round(-float(out["gold_logprob"][t]) * 64)
        assert src_pre[s] == tgt_pre[t], (t, s)
    assert diag.received == diag.boundary == len(bound)
    assert diag.received_at_boundary == diag.received
    assert diag.lost_normalised == 0 and diag.normalised_documents == 0
    lost = diag.lost_at_boundary + diag.lost_special + diag.lost_no_boundary
    assert diag.received + lost == diag.positions == len(tgt_pre)
    # A target BOS row is conditioned on the empty prefix; it is paired only where the source has a row
    # there too (its BOS, or a lone dummy '▁'), else lost to the special token.
    bos_rows = np.asarray(tgt["doc_offsets"])[:-1] if tgt_bos else np.array([], dtype=np.int64)
    unpaired_bos = [t for t in bos_rows.tolist() if t not in bound]
    assert diag.lost_special == len(unpaired_bos)


def test_coverage_equals_the_bound_on_python_source(tmp_path, toks):
    source = inspect.getsource(textwrap)
    texts = [source[i : i + 1500] for i in range(0, 6000, 1500)]
    for src_name, tgt_name in (("smollm2", "mistral"), ("mistral", "smollm2"), ("smollm2", "qwen")):
        src_docs, tgt_docs, src, tgt, out, diag = aligned_pair(tmp_path, toks, src_name, tgt_name, texts)
        _, bound = independent_bound(
            toks[src_name],
            toks[tgt_name],
            src_docs,
            tgt_docs,
            texts,
            BYTE_LEVEL[src_name],
            BYTE_LEVEL[tgt_name],
        )
        assert diag.received == diag.boundary == len(bound) == int(out["aligned"].sum())
        assert diag.positions == sum(len(d) - 1 for d in tgt_docs)
        assert 0.6 < diag.received_fraction < 1.0
        # The paper's method on the same shards: the same bound, fewer rows.
        src_view = TokenizerView.from_tokenizer(toks[src_name])
        tgt_view = TokenizerView.from_tokenizer(toks[tgt_name])
        vmap = build_vocab_map(src_view, tgt_view, "mined", src_ids=needed_source_ids(src))
        _, stats, dtw = align_shard_with_diagnostics(
            src, tgt, src_view, tgt_view, vmap, "mined", *text_arrays(texts)
        )
        assert dtw.boundary == diag.boundary and dtw.received == stats.aligned < diag.received
        assert dtw.received_at_boundary <= dtw.received


# ------------------------------------------------------------------------------------------------
# A hand-worked shard

TEXT = "Hello world.\n\tjson.dumps(x)"
# SmolLM2: Hello | Ġworld | . | Ċ | ĉ | json | . | dumps | ( | x | ) | EOS
#   ends   5       11      12  13  14   18    19   24     25  26  27  27
SRC_IDS = [19556, 905, 30, 198, 197, 5518, 30, 19567, 24, 104, 25, 2]
# Mistral: ▁Hello | ▁world | . | \n | \t | json | . | d | umps | ( | x | ) | </s>
#   ends   5 (the dummy '▁' is no text) 11 12 13 14 18 19 20 24 25 26 27 27
TGT_IDS = [22557, 1526, 28723, 13, 12, 3371, 28723, 28715, 10575, 28732, 28744, 28731, 2]


def test_hand_worked_shard(tmp_path, smollm2_tokenizer, smollm2_view, mistral_tokenizer, mistral_view):
    (src_doc,) = encode_documents(smollm2_tokenizer, [TEXT])
    (tgt_doc,) = encode_documents(mistral_tokenizer, [TEXT])
    assert src_doc.tolist() == SRC_IDS and tgt_doc.tolist() == TGT_IDS
    nl, nl2, space, dot, endoftext = 198, 1116, 216, 30, 0
    lp = np.log([0.5, 0.25, 0.125, 0.0625])
    # Row 2 ('.' -> '\n'): '\n' and '\n\n' both start with <0x0A>: 0.5 + 0.25; row 10 (')' -> EOS): EOS,
    # the special <|endoftext|> (dropped), 'Ġ' -> '▁', '.'.
    rows = {2: ([nl, nl2, space, dot], lp), 10: ([2, endoftext, space, dot], lp)}
    src = shard(tmp_path, "src", extract_arrays([src_doc], smollm2_view, [7], rows, k=4))
    tgt = shard(tmp_path, "tgt", extract_arrays([tgt_doc], mistral_view, [7], k=4))
    proj = build_projection(smollm2_tokenizer, mistral_tokenizer, needed_source_ids(src))
    out, diag = align_shard_exact(src, tgt, smollm2_view, mistral_view, proj, *text_arrays([TEXT], [7]))
    write_shard(tmp_path / "aligned.safetensors", "aligned", out)  # the aligned shard's contract holds

    # Target row t pairs the source row ending at the same byte; t=7 ('d', byte 20) has none; t=11 (')')
    # pairs source row 10 (')'), not row 11 (EOS, the last row predicts nothing).
    pairs = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 8: 7, 9: 8, 10: 9, 11: 10}
    assert out["aligned"].tolist() == [1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0]
    got = {t: round(-float(out["gold_logprob"][t]) * 64) for t in pairs}
    assert got == pairs
    # Row 0: source row 0's [' world', EOS] -> ['▁world', '</s>'] (the default top-k, padded to k=4).
    assert out["topk_ids"][0].tolist() == [1526, 2, -1, -1]
    # Row 2: <0x0A> 0.5 + 0.25, '▁' 0.125, '.' 0.0625.
    assert out["topk_ids"][2].tolist() == [13, 28705, 28723, -1]
    np.testing.assert_allclose(
        np.exp(out["topk_logprobs"][2, :3].astype(float)), [0.75, 0.125, 0.0625], rtol=2e-3
    )
    # Row 11: EOS -> </s> 0.5; <|endoftext|> dropped (0.25 special mass); '▁' 0.125; '.' 0.0625.
    assert out["topk_ids"][11].tolist() == [2, 28705, 28723, -1]
    # Row 7: the fallback one-hot on the next gold token 'umps'; the last row is empty.
    assert out["topk_ids"][7].tolist() == [10575, -1, -1, -1]
    assert out["topk_logprobs"][7].astype(float).tolist() == [0.0, NEG, NEG, NEG]
    assert out["topk_ids"][12].tolist() == [-1] * 4
    # gold_nbytes: bytes of the source token predicted at the paired row (s + 1).
    src_nbytes = smollm2_view.nbytes[SRC_IDS]
    assert out["gold_nbytes"].tolist() == [
        int(src_nbytes[pairs[t] + 1]) if t in pairs else 0 for t in range(13)
    ]
    assert (out["doc_nll"].tolist(), out["doc_index"].tolist()) == ([1.5], [7])
    assert (diag.positions, diag.received, diag.boundary, diag.lost_no_boundary) == (12, 11, 11, 1)
    # Mass: 9 default rows (0.7788 + 0.0498, all projected), rows 2 and 10 (0.9375, 0.25 of it special).
    default = np.exp(np.float16(-0.25)) + np.exp(np.float16(-3.0))
    np.testing.assert_allclose(diag.source_mass, 9 * default + 2 * 0.9375, rtol=1e-3)
    np.testing.assert_allclose(diag.special_mass, 0.25, rtol=1e-3)
    np.testing.assert_allclose(diag.projected_mass, diag.source_mass - 0.25, rtol=1e-3)
    assert diag.to_dict()["received_fraction"] == pytest.approx(11 / 12)


def test_bos_rows_use_the_document_start_modes(tmp_path, toks):
    # Mistral <s> ▁Hello ▁world . </s> against SmolLM2 <|im_start|> Hello Ġworld . <|im_end|>: both BOS
    # rows end at byte 0 and pair. Mistral's BOS row predicts '▁Hello', whose '▁' is its dummy: the text is
    # 'Hello', SmolLM2's own next token. The other way round, SmolLM2's 'Hello' becomes '▁Hello' at
    # Mistral's document start.
    text = ["Hello world."]
    *_, out, _ = aligned_pair(tmp_path, toks, "mistral", "smollm2", text, True, True)
    smollm2 = toks["smollm2"]
    assert out["aligned"].tolist() == [1, 1, 1, 1, 0]
    assert out["topk_ids"][0].tolist() == [smollm2.convert_tokens_to_ids("Hello"), smollm2.eos_token_id]
    assert out["topk_ids"][1, 0] == smollm2.convert_tokens_to_ids("Ġworld")
    *_, out, _ = aligned_pair(tmp_path, toks, "smollm2", "mistral", text, True, True)
    assert out["aligned"].tolist() == [1, 1, 1, 1, 0]
    assert out["topk_ids"][0].tolist() == [toks["mistral"].convert_tokens_to_ids("▁Hello"), 2]


# ------------------------------------------------------------------------------------------------
# Normalisation, empty documents


@pytest.fixture(scope="module")
def nfkc_tokenizer():
    """A small byte-level BPE with an NFKC normalizer, trained here (well under a second)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(["a fine file of five figures: 12 files, 5 fine lines"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


NORMALISED = ["a fine ﬁle: ５ files", "plain fine text"]  # 'ﬁ' (U+FB01) -> 'fi', '５' -> '5' under NFKC


@pytest.mark.parametrize("direction", ["to_nfkc", "from_nfkc"])
def test_text_a_tokenizer_normalises_is_counted_never_misaligned(tmp_path, toks, nfkc_tokenizer, direction):
    toks = {**toks, "nfkc": nfkc_tokenizer}
    src_name, tgt_name = ("smollm2", "nfkc") if direction == "to_nfkc" else ("nfkc", "smollm2")
    src_docs, tgt_docs, _, _, out, diag = aligned_pair(tmp_path, toks, src_name, tgt_name, NORMALISED)
    nfkc_ids = (tgt_docs if tgt_name == "nfkc" else src_docs)[0]
    spelled = b"".join(spell(nfkc_tokenizer, nfkc_ids, byte_level=True))
    assert spelled == b"a fine file: 5 files"  # what the normalising tokenizer's tokens spell
    # Both spell b'a fine ' (7 bytes) identically; everything after is counted, nothing guessed.
    assert diag.normalised_documents == 1
    assert diag.normalised_examples == [
        {"doc_index": 0, "byte": 7, "tokens": ["target" if tgt_name == "nfkc" else "source"]}
    ]
    tgt_tok = toks[tgt_name]
    n0 = len(tgt_docs[0])
    t_spelled = list(itertools.accumulate(spell(tgt_tok, tgt_docs[0], BYTE_LEVEL.get(tgt_name, True))))[:-1]
    beyond = [t for t, p in enumerate(t_spelled) if len(p) > 7]
    assert diag.lost_normalised == len(beyond) > 0
    assert not out["aligned"][beyond].any()
    for t in np.flatnonzero(out["aligned"][: n0 - 1]).tolist():  # paired rows: inside 'a fine '
        assert b"a fine ".startswith(t_spelled[t])
    # The clean second document aligns as usual: every row with a source boundary.
    _, bound = independent_bound(
        toks[src_name], tgt_tok, src_docs[1:], tgt_docs[1:], NORMALISED[1:], True, True
    )
    assert set((np.flatnonzero(out["aligned"][n0:])).tolist()) == bound and bound


def test_empty_documents(tmp_path, toks):
    # An empty text: EOS alone (no positions), or BOS + EOS on both sides: the BOS rows pair, and the
    # source's EOS prediction becomes the target's. 'Hi' is one token for both ('▁Hi' / 'Hi').
    texts = ["", "Hi"]
    for src_bos, tgt_bos, aligned in ((False, False, [0, 1, 0]), (True, True, [1, 0, 1, 1, 0])):
        src_view = TokenizerView.from_tokenizer(toks["mistral"])
        tgt_view = TokenizerView.from_tokenizer(toks["smollm2"])
        head_s = [1] if src_bos else []
        head_t = [1] if tgt_bos else []
        src_docs = [np.array([*head_s, 2]), encode_documents(toks["mistral"], ["Hi"], add_bos=src_bos)[0]]
        tgt_docs = [np.array([*head_t, 2]), encode_documents(toks["smollm2"], ["Hi"], add_bos=tgt_bos)[0]]
        src = shard(tmp_path, "src", extract_arrays(src_docs, src_view, [0, 1]))
        tgt = shard(tmp_path, "tgt", extract_arrays(tgt_docs, tgt_view, [0, 1]))
        proj = build_projection(toks["mistral"], toks["smollm2"], needed_source_ids(src))
        out, diag = align_shard_exact(src, tgt, src_view, tgt_view, proj, *text_arrays(texts))
        assert out["aligned"].tolist() == aligned
        assert diag.positions == len(aligned) - 2 and diag.normalised_documents == 0
        if src_bos:
            assert out["topk_ids"][0, 0] == toks["smollm2"].eos_token_id  # </s> -> <|im_end|>


# ------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_is_refused_with_the_fix(tmp_path, toks, smollm2_view, mistral_view, qwen_view):
    src_docs = encode_documents(toks["smollm2"], ["Hello world.", "x"])
    tgt_docs = encode_documents(toks["mistral"], ["Hello world.", "x"])
    src = shard(tmp_path, "src", extract_arrays(src_docs, smollm2_view, [3, 4]))
    tgt = shard(tmp_path, "tgt", extract_arrays(tgt_docs, mistral_view, [3, 4]))
    text, offsets, _ = text_arrays(["Hello world.", "x"])
    proj = build_projection(toks["smollm2"], toks["mistral"], needed_source_ids(src))
    args = (src, tgt, smollm2_view, mistral_view, proj)
    with pytest.raises(AlignmentError, match=r"doc_text_index lacks documents \[4\]"):
        align_shard_exact(*args, text, offsets, np.array([3, 9]))
    with pytest.raises(AlignmentError, match="doc_text_offsets: expected"):
        align_shard_exact(*args, text, offsets[:-1], np.array([3, 4]))
    with pytest.raises(AlignmentError, match="doc_text: expected the prepared shard's 1-D uint8 text"):
        align_shard_exact(*args, text.astype(np.int64), offsets, np.array([3, 4]))
    with pytest.raises(AlignmentError, match="doc_text_index: document ids repeat"):
        align_shard_exact(*args, text, offsets, np.array([3, 3]))
    lazy = build_projection(toks["smollm2"], toks["mistral"], [905])
    with pytest.raises(AlignmentError, match=r"projection lacks .*src_ids=needed_source_ids"):
        align_shard_exact(src, tgt, smollm2_view, mistral_view, lazy, text, offsets, np.array([3, 4]))
    other = build_projection(toks["smollm2"], toks["qwen"], needed_source_ids(src))
    with pytest.raises(StaleProjectionError, match="another target tokenizer"):
        align_shard_exact(src, tgt, smollm2_view, mistral_view, other, text, offsets, np.array([3, 4]))
    # The text of another corpus: tokens that spell nothing of it are counted, not paired.
    wrong = text_arrays(["Goodbye", "y"], [3, 4])
    out, diag = align_shard_exact(*args, *wrong)
    assert not out["aligned"].any() and diag.lost_normalised == diag.positions
    assert diag.normalised_documents == 2
    # A document without tokens.
    empty = extract_arrays([src_docs[1]], smollm2_view, [4])
    empty["doc_index"], empty["doc_offsets"] = np.array([3, 4]), np.array([0, 0, len(src_docs[1])])
    for key in ("doc_nll", "doc_pred_nbytes", "doc_n_pred"):
        empty[key] = np.resize(empty[key], 2)
    bad = shard(tmp_path, "bad", empty)
    with pytest.raises(AlignmentError, match="document 3 has no tokens"):
        align_shard_exact(bad, tgt, smollm2_view, mistral_view, proj, text, offsets, np.array([3, 4]))


# ------------------------------------------------------------------------------------------------
# The DTW methods next to exact


def test_methods_list_and_dtw_diagnostics(tmp_path, toks, smollm2_view, mistral_view):
    assert METHODS == ("mined", "em")
    src_docs = encode_documents(toks["smollm2"], [TEXT])
    tgt_docs = encode_documents(toks["mistral"], [TEXT])
    src = shard(tmp_path, "src", extract_arrays(src_docs, smollm2_view, [0]))
    tgt = shard(tmp_path, "tgt", extract_arrays(tgt_docs, mistral_view, [0]))
    vmap = build_vocab_map(smollm2_view, mistral_view, "mined", src_ids=needed_source_ids(src))
    with pytest.raises(AlignmentError, match="align_shard_exact"):
        align_shard(src, tgt, smollm2_view, mistral_view, vmap, "exact")
    plain, stats = align_shard_with_stats(src, tgt, smollm2_view, mistral_view, vmap, "mined")
    out, stats2, diag = align_shard_with_diagnostics(
        src, tgt, smollm2_view, mistral_view, vmap, "mined", *text_arrays([TEXT])
    )
    for name in plain:
        np.testing.assert_array_equal(out[name], plain[name], err_msg=name)
    assert stats2 == stats
    # DTW + MinED takes rows 1-5 and 8-11 (test_align); 'Hello' at row 0 is rejected though its context
    # is the same; 9 received, all at byte boundaries; the bound is exact's 11.
    assert (diag.method, diag.received, diag.received_at_boundary, diag.boundary) == ("mined", 9, 9, 11)
    assert (diag.lost_at_boundary, diag.lost_no_boundary, diag.lost_special) == (2, 1, 0)
    pairing = pair_rows(src, tgt, smollm2_view, mistral_view, *text_arrays([TEXT]))
    assert pairing.src_row.tolist() == [0, 1, 2, 3, 4, 5, 6, -1, 7, 8, 9, 10, -1]


# ------------------------------------------------------------------------------------------------
# Gemma 3 (SentencePiece without a dummy prefix), when its GGUF is in the model cache

GEMMA = sorted(glob.glob("/work/main/.cache/models/gemma3-270m/*.gguf"))


@pytest.mark.slow
@pytest.mark.skipif(not GEMMA, reason="no Gemma 3 GGUF in /work/main/.cache/models/gemma3-270m")
def test_gemma3(tmp_path, toks):
    from pathlib import Path

    from fusion.hub import load_tokenizer

    path = Path(GEMMA[0])
    gemma = load_tokenizer(str(path.parent), path.name)  # ~1 min: the GGUF's 262k-token vocabulary
    toks = {**toks, "gemma": gemma}
    byte_level = {**BYTE_LEVEL, "gemma": False}
    # Gemma 3 is SentencePiece without a dummy prefix: 'Hello' is 'Hello' at a document start too.
    proj = build_projection(toks["smollm2"], gemma, _ids(toks["smollm2"], ["Ġpickle", "Hello", "ä½"]))
    assert not proj.tgt_dummy
    first = gemma(" pickle", add_special_tokens=False)["input_ids"][0]
    assert proj.ids[:, _ids(toks["smollm2"], ["Ġpickle"])[0]].tolist() == [first] * 4
    assert proj.ids[0, _ids(toks["smollm2"], ["ä½"])[0]] == gemma.convert_tokens_to_ids("<0xE4>")
    for src_name, tgt_name in (("smollm2", "gemma"), ("gemma", "mistral")):
        src_docs, tgt_docs, _, _, out, diag = aligned_pair(
            tmp_path, toks, src_name, tgt_name, TRICKY, True, True
        )
        _, bound = independent_bound(
            toks[src_name],
            toks[tgt_name],
            src_docs,
            tgt_docs,
            TRICKY,
            byte_level[src_name],
            byte_level[tgt_name],
        )
        assert set(np.flatnonzero(out["aligned"]).tolist()) == bound
        assert diag.received == diag.boundary == len(bound) and diag.normalised_documents == 0
        assert diag.lost_special == 0  # both start with BOS: the BOS rows pair


def _ids(tok, pieces):
    ids = tok.convert_tokens_to_ids(pieces)
    assert None not in ids
    return ids
