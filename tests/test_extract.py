"""fusion.extract: top-k log-probs of tiny random models of three architectures with real tokenizers."""

from __future__ import annotations

import inspect
import itertools
import json

import numpy as np
import pytest
import torch

from fusion.extract import ExtractionError, check_head_matches_forward, extract_documents, plan_batches
from fusion.format import read_shard, write_shard
from fusion.models import random_init_model
from fusion.tokens import encode_documents

torch.set_num_threads(2)

FP16_ATOL = 1.5e-2  # fp16 spacing is 2**-6 = 0.016 for |x| in [16, 32); random-init log-probs are ~ -10


def _texts() -> list[str]:
    """Real text no one here wrote: pieces of the stdlib's json and inspect sources (varied lengths)."""
    src = inspect.getsource(json) + inspect.getsource(inspect)[:6000]
    cuts = [0, 40, 400, 460, 1300, 1500, 1510, 2400, 3100, 3180]
    return [src[a:b] for a, b in itertools.pairwise(cuts)]


PAIRS = [("llama", "smollm2"), ("gpt_neox", "mistral"), ("gemma3", "qwen")]


@pytest.fixture(params=PAIRS, ids=[f"{a}-{t}" for a, t in PAIRS])
def model_and_tok(request):
    arch, tok_name = request.param
    tok = request.getfixturevalue(f"{tok_name}_tokenizer")
    view = request.getfixturevalue(f"{tok_name}_view")
    model = random_init_model(
        arch, view.vocab_size, hidden_size=32, num_layers=2, num_heads=4, seed=11, eos_token_id=view.eos_id
    )
    if arch == "gemma3":
        model.config.final_logit_softcapping = 4.0  # the model's forward applies it; extraction must too
    return model, tok, view


def _dense(model, doc: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        logits = model(input_ids=torch.as_tensor(doc, dtype=torch.long)[None]).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def test_topk_equals_dense_forward_and_bucketing_changes_nothing(model_and_tok) -> None:
    model, tok, view = model_and_tok
    docs = encode_documents(tok, _texts())
    idx = np.arange(100, 100 + len(docs))
    out = extract_documents(model, view, docs, idx, top_k=8, batch_tokens=600)
    off = out["doc_offsets"]
    assert out["input_ids"].dtype == (np.uint16 if view.vocab_size <= 65536 else np.int32)
    assert out["topk_ids"].dtype == out["input_ids"].dtype
    np.testing.assert_array_equal(out["doc_index"], idx)
    for d, doc in enumerate(docs):
        rows = slice(off[d], off[d + 1])
        dense = _dense(model, doc)
        want_vals, _ = torch.topk(dense, 8, dim=-1)
        ids = torch.as_tensor(out["topk_ids"][rows].astype(np.int64))
        got = out["topk_logprobs"][rows].astype(np.float32)
        # Values equal the dense top-k; the stored ids carry exactly those log-probs (robust to exact ties).
        np.testing.assert_allclose(got, want_vals.numpy(), atol=FP16_ATOL, rtol=0)
        np.testing.assert_allclose(got, dense.gather(-1, ids).numpy(), atol=FP16_ATOL, rtol=0)
        assert np.all(np.diff(got, axis=1) <= 0)  # best first
        gold = dense[torch.arange(len(doc) - 1), torch.as_tensor(doc[1:], dtype=torch.long)].numpy()
        np.testing.assert_allclose(out["gold_logprob"][rows][:-1], gold, atol=FP16_ATOL, rtol=0)
        assert out["gold_logprob"][rows][-1] == 0  # the last row predicts nothing
        assert out["doc_nll"][d] == pytest.approx(-gold.astype(np.float64).sum(), rel=1e-5)
        assert out["doc_n_pred"][d] == len(doc) - 1
        assert out["doc_pred_nbytes"][d] == int(view.nbytes[doc[1:]].astype(np.int64).sum())

    # One document per batch gives the same result as length-bucketed batches.
    single = extract_documents(model, view, docs, idx, top_k=8, batch_tokens=1)
    for name in ("input_ids", "token_nbytes", "doc_offsets", "doc_n_pred", "doc_pred_nbytes"):
        np.testing.assert_array_equal(single[name], out[name])
    for name in ("topk_logprobs", "gold_logprob"):
        np.testing.assert_allclose(
            single[name].astype(np.float32), out[name].astype(np.float32), atol=FP16_ATOL, rtol=0
        )
    np.testing.assert_allclose(single["doc_nll"], out["doc_nll"], rtol=1e-4)
    same_ids = (single["topk_ids"] == out["topk_ids"]).mean()
    assert same_ids > 0.99  # only near-exact ties may swap order


def test_hand_counted_bytes_and_positions(smollm2_tokenizer, smollm2_view) -> None:
    # SmolLM2 (byte-level BPE): "Hello world" -> 'Hello', 'Ġworld', then EOS '<|endoftext|>' (0 bytes).
    (doc,) = encode_documents(smollm2_tokenizer, ["Hello world"])
    assert [smollm2_view.token_bytes[i] for i in doc] == [b"Hello", b" world", b""]
    model = random_init_model("llama", smollm2_view.vocab_size, hidden_size=16, num_heads=2, seed=1)
    eos_only = np.array([smollm2_view.eos_id], dtype=np.int32)  # a one-token document predicts nothing
    out = extract_documents(model, smollm2_view, [doc, eos_only], np.array([7, 8]), top_k=3)
    np.testing.assert_array_equal(out["token_nbytes"], [5, 6, 0, 0])
    assert out["doc_pred_nbytes"].tolist() == [6, 0]  # ' world' (6) + EOS (0); 'Hello' is never predicted
    assert out["doc_n_pred"].tolist() == [2, 0]
    assert out["doc_nll"][1] == 0 and out["doc_nll"][0] > 0
    np.testing.assert_array_equal(out["gold_logprob"][[2, 3]], [0, 0])  # last rows
    np.testing.assert_array_equal(out["doc_offsets"], [0, 3, 4])
    assert out["topk_ids"].shape == (4, 3)


def test_length_bucketed_batches_are_padded_only_to_their_own_length(mistral_tokenizer, mistral_view) -> None:
    # Sorted longest first; each batch's rows x its own longest <= batch_tokens.
    assert [b.tolist() for b in plan_batches(np.array([5, 100, 7, 50, 3]), 120)] == [[1], [3, 2], [0, 4]]
    assert [b.tolist() for b in plan_batches(np.array([4, 4, 4]), 8)] == [[0, 1], [2]]
    assert [b.tolist() for b in plan_batches(np.array([300]), 64)] == [[0]]  # too long: alone, unsplit

    docs = encode_documents(mistral_tokenizer, _texts())
    model = random_init_model("llama", mistral_view.vocab_size, hidden_size=16, num_heads=2)
    shapes: list[tuple[int, int]] = []
    model.base_model.register_forward_pre_hook(
        lambda _m, _a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    seen: list[int] = []
    extract_documents(
        model, mistral_view, docs, np.arange(len(docs)), top_k=2, batch_tokens=512, progress=seen.append
    )
    lengths = np.array([len(d) for d in docs])
    expected = [(len(b), int(lengths[b].max())) for b in plan_batches(lengths, 512)]
    # First two forwards: the head-vs-forward check on the first document's first 16 tokens.
    assert shapes[:2] == [(1, min(16, len(docs[0])))] * 2
    assert shapes[2:] == expected
    assert all(r * w <= 512 or r == 1 for r, w in expected)
    assert sum(seen) == lengths.sum() and len(seen) == len(expected)


def test_padded_vocab_never_stores_padding_ids(qwen_tokenizer, qwen_view) -> None:
    # Qwen-like: config.vocab_size > len(tokenizer). Make the padding rows' logits the largest of all.
    n_tok = qwen_view.vocab_size
    model = random_init_model("qwen2", n_tok + 37, hidden_size=16, num_heads=2, seed=3)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[n_tok:] = head[:37] * 50
    docs = encode_documents(qwen_tokenizer, ["def f(x):\n    return x + 1\n", "Padded vocabularies."])
    out = extract_documents(model, qwen_view, docs, np.arange(2), top_k=5)
    assert out["topk_ids"].max() < n_tok
    assert out["topk_ids"].dtype == np.int32  # 151k tokens do not fit uint16
    dense = _dense(model, docs[0])  # full softmax over all 151k + 37 rows
    assert int(dense.argmax(-1)[0]) >= n_tok  # the padding rows would have won
    rows = slice(0, len(docs[0]))
    ids = torch.as_tensor(out["topk_ids"][rows].astype(np.int64))
    np.testing.assert_allclose(
        out["topk_logprobs"][rows].astype(np.float32), dense.gather(-1, ids).numpy(), atol=FP16_ATOL, rtol=0
    )


def test_deterministic_and_round_trips_through_a_shard(tmp_path, mistral_tokenizer, mistral_view) -> None:
    docs = encode_documents(mistral_tokenizer, _texts()[:4])
    model = random_init_model("mistral", mistral_view.vocab_size, hidden_size=16, num_heads=2, seed=5)
    a = extract_documents(model, mistral_view, docs, np.arange(4), top_k=4, batch_tokens=300)
    b = extract_documents(model, mistral_view, docs, np.arange(4), top_k=4, batch_tokens=300)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    info = write_shard(tmp_path / "s.safetensors", "extract", a)
    shard = read_shard(info.path, "extract", info.sha256)
    np.testing.assert_array_equal(shard["topk_ids"], a["topk_ids"])
    assert info.counts == {"documents": 4, "tokens": int(sum(len(d) for d in docs))}


def test_bad_input_errors_name_the_problem(mistral_view) -> None:
    model = random_init_model("llama", mistral_view.vocab_size, hidden_size=16, num_heads=2)
    doc = np.array([1, 50, 60, mistral_view.eos_id], dtype=np.int32)
    with pytest.raises(ExtractionError, match=r"top_k=40000 exceeds the vocabulary size 32000"):
        extract_documents(model, mistral_view, [doc], np.arange(1), top_k=40000)
    with pytest.raises(ExtractionError, match=r"documents \[1\] are empty"):
        extract_documents(model, mistral_view, [doc, np.array([], dtype=np.int32)], np.arange(2))
    with pytest.raises(ExtractionError, match="no documents"):
        extract_documents(model, mistral_view, [], np.arange(0))
    with pytest.raises(ExtractionError, match="outside the tokenizer's vocabulary"):
        extract_documents(model, mistral_view, [np.array([5, 32000])], np.arange(1))
    with pytest.raises(ExtractionError, match="doc_index"):
        extract_documents(model, mistral_view, [doc], np.arange(2))
    small = random_init_model("llama", 1000, hidden_size=16, num_heads=2)
    with pytest.raises(ExtractionError, match="only 1000 output rows"):
        extract_documents(small, mistral_view, [doc], np.arange(1))
    short = random_init_model(
        "llama", mistral_view.vocab_size, hidden_size=16, num_heads=2, max_position_embeddings=3
    )
    with pytest.raises(ExtractionError, match="max_position_embeddings"):
        extract_documents(short, mistral_view, [doc], np.arange(1))


def test_unsupported_logit_transform_is_refused() -> None:
    # Cohere multiplies logits by config.logit_scale inside its forward; the split head must notice.
    from transformers import AutoModelForCausalLM, CohereConfig

    cfg = CohereConfig(
        vocab_size=300,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=32,
        logit_scale=0.25,
    )
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(ExtractionError, match="do not reproduce the model's logits"):
        check_head_matches_forward(model, np.arange(10))
