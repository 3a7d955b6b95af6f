"""fusion.evaluate: per-document scores reuse the extraction forward; bits/byte and perplexity by hand."""

from __future__ import annotations

import inspect
import math
import textwrap

import numpy as np
import pytest
import torch

from fusion.evaluate import DocScores, bits_per_byte, paired_bpb_difference, perplexity, score_documents
from fusion.extract import ExtractionError, extract_documents
from fusion.models import random_init_model
from fusion.tokens import encode_documents

torch.set_num_threads(2)


def _docstrings() -> list[str]:
    """English prose no one here wrote: docstrings of standard-library functions."""
    import json
    import textwrap as tw

    funcs = [json.dumps, json.loads, tw.wrap, tw.dedent, inspect.getsource, inspect.signature]
    return [textwrap.dedent(f.__doc__ or "").strip() for f in funcs]


def test_metrics_by_hand() -> None:
    # 12 bits of nll over 8 bytes = 1.5 bits/byte; 12 ln 2 nats over 4 tokens -> perplexity 2**3 = 8.
    s = DocScores(
        nll=np.array([8 * math.log(2), 4 * math.log(2)]),
        n_pred=np.array([2, 2]),
        pred_nbytes=np.array([4, 4]),
    )
    assert bits_per_byte(s) == pytest.approx(1.5)
    assert perplexity(s) == pytest.approx(8.0)
    empty = DocScores(nll=np.zeros(1), n_pred=np.zeros(1, np.int64), pred_nbytes=np.zeros(1, np.int64))
    assert math.isnan(bits_per_byte(empty)) and math.isnan(perplexity(empty))


def test_paired_difference_and_its_bootstrap_interval() -> None:
    # A - B is 1 bit per byte in every document: every resample says 1, so the interval is [1, 1].
    same = paired_bpb_difference(np.array([2.0, 4.0]), np.array([1.0, 2.0]), np.array([1, 2]))
    assert same == (1.0, 1.0, 1.0)
    # Two documents, A better by 1 bit in one and worse by 1 bit in the other (1 byte each): the difference
    # is 0; resamples give -1 (both draws the first, p 1/4), 0 (p 1/2) or +1 (p 1/4): 95% interval [-1, 1].
    delta, lo, hi = paired_bpb_difference(np.array([1.0, 3.0]), np.array([2.0, 2.0]), np.array([1, 1]))
    assert (delta, lo, hi) == (0.0, -1.0, 1.0)
    # Differences weigh by bytes: (10 - 12) / (10 + 30) = -0.05
    assert paired_bpb_difference(np.array([5.0, 5.0]), np.array([6.0, 6.0]), np.array([10, 30]))[0] == -0.05
    with pytest.raises(ValueError, match="same documents"):
        paired_bpb_difference(np.array([1.0]), np.array([1.0, 2.0]), np.array([1, 1]))


def test_fused_vs_clm_needs_both_models() -> None:
    from jobs.stages.evaluate import fused_vs_clm

    one = {"doc_bits": [4.0, 8.0], "doc_bytes": [4, 4]}
    two = {"doc_bits": [4.0, 4.0], "doc_bytes": [4, 4]}
    assert fused_vs_clm({"fused": one}) is None
    out = fused_vs_clm({"fused": two, "clm": one})
    assert out is not None and out["bits_per_byte"] == -0.5 and out["ci95_low"] <= -0.5 <= out["ci95_high"]


@pytest.mark.parametrize(("arch", "tok_name"), [("gpt_neox", "mistral"), ("gemma3", "smollm2")])
def test_scores_equal_extraction_and_a_random_model_is_uniform(arch, tok_name, request) -> None:
    tok = request.getfixturevalue(f"{tok_name}_tokenizer")
    view = request.getfixturevalue(f"{tok_name}_view")
    docs = encode_documents(tok, _docstrings())
    model = random_init_model(arch, view.vocab_size, hidden_size=32, num_heads=4, seed=2)
    scores = score_documents(model, view, docs, batch_tokens=256)
    ext = extract_documents(model, view, docs, np.arange(len(docs)), top_k=1, batch_tokens=4096)
    np.testing.assert_allclose(scores.nll, ext["doc_nll"], rtol=1e-5)
    np.testing.assert_array_equal(scores.n_pred, ext["doc_n_pred"])
    np.testing.assert_array_equal(scores.pred_nbytes, ext["doc_pred_nbytes"])
    # A freshly initialised model (weights ~ N(0, 0.02)) is close to uniform: perplexity ~ vocabulary size,
    # bits per byte ~ log2(V) / (bytes per predicted token).
    assert perplexity(scores) == pytest.approx(view.vocab_size, rel=0.05)
    bytes_per_token = scores.pred_nbytes.sum() / scores.n_pred.sum()
    assert bits_per_byte(scores) == pytest.approx(math.log2(view.vocab_size) / bytes_per_token, rel=0.01)


def test_bad_documents_are_refused(mistral_view) -> None:
    model = random_init_model("llama", mistral_view.vocab_size, hidden_size=16, num_heads=2)
    with pytest.raises(ExtractionError, match="evaluation: documents \\[0\\] are empty"):
        score_documents(model, mistral_view, [np.array([], dtype=np.int32)])
