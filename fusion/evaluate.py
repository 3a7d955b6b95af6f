"""Held-out scoring: negative log-likelihood per document, bits per byte and perplexity.

Bits per byte (total nll / ln 2 / bytes of the predicted text) is the metric comparable across models with
different tokenizers; perplexity is per token of the model's own tokenizer, so it compares only models
that share one (the target before and after training). The forward is extraction's (length-bucketed, LM
head in chunks, fp32 log-softmax), keeping only the gold log-probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fusion.extract import TokenView, forward_logprobs


@dataclass(frozen=True)
class DocScores:
    """Per document: nll (nats, summed over predicted positions), predicted tokens, their bytes of text."""

    nll: np.ndarray  # float64 [D]
    n_pred: np.ndarray  # int64 [D]
    pred_nbytes: np.ndarray  # int64 [D]

    @property
    def total_nll(self) -> float:
        return float(self.nll.sum())


def score_documents(
    model,
    view: TokenView,
    docs: list[np.ndarray],
    batch_tokens: int = 8192,
    progress: Callable[[int], None] | None = None,
) -> DocScores:
    """Score `docs` (token ids, EOS included, no BOS): row t predicts token t+1, the last row nothing."""
    res = forward_logprobs(model, docs, int(view.vocab_size), 0, batch_tokens, progress, "evaluation")
    offsets, predicts = res["offsets"], res["predicts"]
    starts = offsets[:-1]
    nll = -np.add.reduceat(res["gold_logprob"].astype(np.float64), starts)
    next_nbytes = np.append(np.asarray(view.nbytes, dtype=np.int64)[res["input_ids"][1:]], 0)
    pred_nbytes = np.add.reduceat(np.where(predicts, next_nbytes, 0), starts)
    return DocScores(nll=nll, n_pred=np.diff(offsets) - 1, pred_nbytes=pred_nbytes)


def bits_per_byte(scores: DocScores) -> float:
    """Total nll in bits over the bytes of text predicted; NaN when nothing with bytes was predicted."""
    nbytes = int(scores.pred_nbytes.sum())
    return scores.total_nll / math.log(2) / nbytes if nbytes else float("nan")


def perplexity(scores: DocScores) -> float:
    """exp(mean nll per predicted token) of the model's own tokenization; NaN when nothing was predicted."""
    n = int(scores.n_pred.sum())
    return math.exp(scores.total_nll / n) if n else float("nan")


def paired_bpb_difference(
    bits_a: np.ndarray,
    bits_b: np.ndarray,
    nbytes: np.ndarray,
    samples: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Bits per byte of model A minus model B on the same documents, with a paired bootstrap interval.

    bits_a, bits_b: each document's total nll in bits under A and B; nbytes: its predicted bytes (the same
    text under one tokenizer). Documents are resampled with replacement, `samples` times, vectorised; the
    interval is the central `level` share of the resampled differences. It measures how much the verdict
    depends on which held-out documents were drawn, not the training's own randomness (seeds)."""
    a, b, n = (np.asarray(x, dtype=np.float64) for x in (bits_a, bits_b, nbytes))
    if not (a.shape == b.shape == n.shape) or a.ndim != 1 or a.size == 0:
        raise ValueError("bits_a, bits_b and nbytes must be non-empty 1-D arrays of the same documents")
    delta = float((a.sum() - b.sum()) / n.sum())
    idx = np.random.default_rng(seed).integers(0, a.size, size=(samples, a.size))
    resampled = ((a - b)[idx].sum(axis=1)) / n[idx].sum(axis=1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(resampled, [tail, 1.0 - tail])
    return delta, float(lo), float(hi)
