"""Fusion (FuseLLM step 6): one training distribution per target position from several candidates.

Candidates, in order: the target's own extract shard (when include_target; its ids are target ids
already, and the last row of each document is empty), then each source's ALIGNED shard (its top-k mapped
onto the target's positions and vocabulary; unaligned positions hold a one-hot on the next gold token).
Each candidate's distribution at a position is softmax(top-k log-probs / T) over its non-empty entries
(one-hot rows stay one-hot at any T).

Which candidate is better is decided by its cross-entropy:
  ce_unit "byte"  : bits per byte, nll / ln 2 / bytes of the predicted text: comparable across tokenizers
                    (the default; fixes defect 2: per-token CE favours tokenizers with longer tokens)
  ce_unit "token" : nll / predicted tokens (the reference's measure, for fidelity)
  level "sequence": one CE per document (doc_nll over its predicted positions)
  level "token"   : one CE per position, -log p(gold) [/ ln 2 / bytes of the token predicted there]; a
                    source's unaligned positions (and every candidate's last rows) are not eligible
Special tokens stand for 0 bytes; they count as one byte so that a CE stays finite.

MinCE keeps the distribution of the candidate with the lowest CE (ties: the lowest index, i.e. the
target); AvgCE mixes all with weights softmax_j(exp(-CE_j)) over the union of their ids, duplicates summed,
renormalised per row (a candidate with an empty row there, e.g. an aligned row whose ids all failed to map,
leaves its weight to the others). Rows that end up empty (last rows; MinCE picking an empty row) carry no
fusion target: the loss skips them.

Everything is numpy, vectorised over positions: the decisions (MinCE's pick, AvgCE's weights) come first
from per-document / per-row figures, per-document values reaching positions through np.repeat; the [N, k]
top-k arrays are then fused in blocks of rows read from the memory-mapped shards (memory bounded by the
block), duplicate ids merging through per-row sorts and running sums. No loop over tokens or documents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fusion.format import Shard

STRATEGIES = ("minCE", "avgCE")
LEVELS = ("sequence", "token")
CE_UNITS = ("byte", "token")
CE_BASES = ("own", "target")  # decide by each model's CE on its own tokens, or on the target's as fused
FALLBACKS = ("onehot", "target")  # what a source gives where it has no distribution
GOLD_FLOOR = 1e-4  # probability charged for a gold token outside a candidate's entries (13.3 bits)
_EMPTY_KEY = np.iinfo(np.int32).max  # sorts after every real id


class FusionError(ValueError):
    """Candidates that cannot be fused (mismatched documents, bad settings); names the shard and the fix."""


_BLOCK_ROWS = 1 << 16  # rows fused at a time: [rows, K] temporaries stay ~tens of MB whatever the shard


@dataclass
class Candidate:
    """One candidate, aligned to the target's positions: per-row and per-document figures in memory, its
    [N, k] top-k arrays read block by block from the memory-mapped shard (`block`)."""

    shard: Shard
    empty_rows: np.ndarray  # bool [N]: rows forced empty (the target's last rows)
    eligible: np.ndarray  # bool [N]: positions where its per-position CE is defined
    gold_logprob: np.ndarray  # float32 [N]
    gold_nbytes: np.ndarray  # int64 [N]: bytes of the token predicted at each position
    doc_nll: np.ndarray  # float64 [D]
    doc_pred_nbytes: np.ndarray  # int64 [D]
    doc_n_pred: np.ndarray  # int64 [D]
    top_k: int | None = None  # keep only the k most likely entries of each row (None: all stored)
    fallback: Candidate | None = None  # whose rows stand in where this one has no distribution

    @property
    def width(self) -> int:
        stored = int(self.shard.rows("topk_ids", 0, 0).shape[1])
        return stored if self.top_k is None else min(stored, self.top_k)

    def block(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows [start, stop): ids int32 (-1 empty) and log-probs float32 (-inf empty), at most top_k
        entries a row, most likely first when truncated (ties: the stored order)."""
        ids = np.asarray(self.shard.rows("topk_ids", start, stop)).astype(np.int32)
        logprobs = np.asarray(self.shard.rows("topk_logprobs", start, stop)).astype(np.float32)
        ids[self.empty_rows[start:stop]] = -1
        logprobs[ids < 0] = -np.inf
        if self.top_k is not None and self.top_k < ids.shape[1]:
            keep = np.argsort(-logprobs, axis=1, kind="stable")[:, : self.top_k]
            ids = np.take_along_axis(ids, keep, axis=1)
            logprobs = np.take_along_axis(logprobs, keep, axis=1)
        if self.fallback is not None:
            ids, logprobs = self._fall_back(start, stop, ids, logprobs)
        return ids, logprobs

    def _fall_back(
        self, start: int, stop: int, ids: np.ndarray, logprobs: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The fallback candidate's rows where this one holds no distribution of its own (a source's
        unaligned rows), padded or cut to this candidate's width."""
        assert self.fallback is not None
        none = ~self.eligible[start:stop]
        if not none.any():
            return ids, logprobs
        f_ids, f_lp = self.fallback.block(start, stop)
        w = ids.shape[1]
        if f_ids.shape[1] < w:
            pad = w - f_ids.shape[1]
            f_ids = np.pad(f_ids, ((0, 0), (0, pad)), constant_values=-1)
            f_lp = np.pad(f_lp, ((0, 0), (0, pad)), constant_values=-np.inf)
        ids, logprobs = ids.copy(), logprobs.copy()
        ids[none], logprobs[none] = f_ids[none, :w], f_lp[none, :w]
        return ids, logprobs


def _last_rows(offsets: np.ndarray, n: int) -> np.ndarray:
    last = np.zeros(n, dtype=bool)
    last[offsets[1:][np.diff(offsets) > 0] - 1] = True
    return last


def _doc_figures(shard: Shard) -> dict[str, np.ndarray]:
    return {
        "doc_nll": np.asarray(shard["doc_nll"]).astype(np.float64),
        "doc_pred_nbytes": np.asarray(shard["doc_pred_nbytes"]).astype(np.int64),
        "doc_n_pred": np.asarray(shard["doc_n_pred"]).astype(np.int64),
    }


def target_candidate(shard: Shard) -> Candidate:
    """The target's extract shard as a candidate: the last row of each document predicts nothing -> empty."""
    if shard.kind != "extract":
        raise FusionError(f"{shard.path}: the target's candidate must be an extract shard, got {shard.kind}")
    offsets = np.asarray(shard["doc_offsets"])
    n = int(offsets[-1])
    last = _last_rows(offsets, n)
    nbytes = np.asarray(shard["token_nbytes"]).astype(np.int64)
    next_nbytes = np.append(nbytes[1:], 0) if n else nbytes
    return Candidate(
        shard=shard,
        empty_rows=last,
        eligible=~last,
        gold_logprob=np.asarray(shard["gold_logprob"]).astype(np.float32),
        gold_nbytes=next_nbytes,
        **_doc_figures(shard),
    )


def aligned_candidate(shard: Shard) -> Candidate:
    """A source's aligned shard as a candidate: its per-position CE exists only where it aligned 1:1."""
    if shard.kind != "aligned":
        raise FusionError(f"{shard.path}: a source's candidate must be an aligned shard, got {shard.kind}")
    aligned = np.asarray(shard["aligned"]) == 1
    return Candidate(
        shard=shard,
        empty_rows=np.zeros(len(aligned), dtype=bool),
        eligible=aligned,
        gold_logprob=np.asarray(shard["gold_logprob"]).astype(np.float32),
        gold_nbytes=np.asarray(shard["gold_nbytes"]).astype(np.int64),
        **_doc_figures(shard),
    )


def sequence_ce(c: Candidate, ce_unit: str) -> np.ndarray:
    """Per-document CE [D]: bits per byte or nats per token (documents that predict nothing: 0)."""
    if ce_unit == "byte":
        return c.doc_nll / math.log(2) / np.maximum(c.doc_pred_nbytes, 1)
    return c.doc_nll / np.maximum(c.doc_n_pred, 1)


def token_ce(c: Candidate, ce_unit: str) -> np.ndarray:
    """Per-position CE [N]; +inf where the candidate is not eligible (unaligned, last rows)."""
    nll = -c.gold_logprob.astype(np.float64)
    if ce_unit == "byte":
        nll = nll / math.log(2) / np.maximum(c.gold_nbytes, 1)
    return np.where(c.eligible, nll, np.inf)


def gold_ids(target: Shard) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per target row: the gold next id, its bytes, and whether the row predicts (not a document's last)."""
    ids = np.asarray(target["input_ids"]).astype(np.int64)
    nbytes = np.asarray(target["token_nbytes"]).astype(np.int64)
    offsets = np.asarray(target["doc_offsets"])
    predicts = ~_last_rows(offsets, len(ids))
    return np.append(ids[1:], -1), np.append(nbytes[1:], 0), predicts


def gold_probability(c: Candidate, gold: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Per row, as fusion uses the candidate: q(gold) (0 when gold is not among its entries) and the
    full-softmax mass of the entries kept (the sum of their stored probabilities)."""
    n = len(gold)
    q_gold, kept = np.zeros(n), np.zeros(n)
    for start in range(0, n, _BLOCK_ROWS):
        stop = min(n, start + _BLOCK_ROWS)
        ids, lp = c.block(start, stop)
        q = softmax_rows(lp, temperature)
        q_gold[start:stop] = np.where(ids == gold[start:stop, None], q, 0.0).sum(axis=1)
        kept[start:stop] = np.exp(lp).sum(axis=1)
    return q_gold, kept


def fused_view_ce(
    cands: list[Candidate], target: Shard, temperature: float, ce_unit: str, level: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """Each candidate's CE on the TARGET's gold tokens as fusion would use it (softmax over its entries at
    temperature T; a gold token outside them charged GOLD_FLOOR), comparable across candidates because all
    are measured on the same rows: (ce [C, D] or [C, N], eligible or None).

    sequence: per document, over the rows where every candidate has a distribution of its own (or its
    fallback's); a document with no such row gives every candidate 0 (ties go to the first). token: per
    row, +inf where the candidate has none."""
    gold, nbytes, predicts = gold_ids(target)
    units = nbytes.clip(min=1) if ce_unit == "byte" else np.ones_like(nbytes)
    has = np.stack([c.eligible | (c.fallback is not None) for c in cands]) & predicts
    bits = np.stack(
        [-np.log2(np.maximum(gold_probability(c, gold, temperature)[0], GOLD_FLOOR)) for c in cands]
    )
    if ce_unit == "token":
        bits = bits * math.log(2)  # nats per token, like the own-basis per-token CE
    if level == "token":
        return np.where(has, bits / units, np.inf), has
    common = has.all(axis=0)
    offsets = np.asarray(target["doc_offsets"])
    doc = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    n_docs = len(offsets) - 1
    num = np.stack([np.bincount(doc[common], weights=b[common], minlength=n_docs) for b in bits])
    den = np.bincount(doc[common], weights=units[common], minlength=n_docs)
    return np.where(den > 0, num / np.maximum(den, 1), 0.0), None


def softmax_rows(logprobs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logprobs / T) per row over finite entries; all-empty rows give all zeros."""
    x = logprobs / temperature
    top = np.max(x, axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.exp(x - top)  # exp(-inf) = 0 for empty entries
    total = e.sum(axis=1, keepdims=True)
    return e / np.where(total > 0, total, 1.0)


def ce_weights(ce: np.ndarray, eligible: np.ndarray | None = None) -> np.ndarray:
    """AvgCE weights over candidates (axis 0): softmax_j(r_j), r_j = exp(-CE_j), over eligible ones.

    Where no candidate is eligible, all share equally (their rows are then one-hots or empty)."""
    r = np.exp(-ce)
    if eligible is None:
        eligible = np.ones(ce.shape, dtype=bool)
    none = ~eligible.any(axis=0, keepdims=True)
    use = eligible | none
    e = np.where(use, np.exp(r - np.where(use, r, -np.inf).max(axis=0, keepdims=True)), 0.0)
    return e / e.sum(axis=0, keepdims=True)


def merge_rows(ids: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum probabilities of repeated ids within each row, renormalise, sort best first, pad -1 / 0.

    ids int32 [N, W] (-1 empty), probs float [N, W]. Vectorised over [N, W]: a per-row sort by id makes
    repeats contiguous runs; a run's sum is a difference of the row's running sums, kept at the run's last
    slot (other slots emptied); then a per-row sort by probability."""
    n, w = ids.shape
    valid = ids >= 0
    key = np.where(valid, ids, _EMPTY_KEY).astype(np.int32)
    order = np.argsort(key, axis=1, kind="stable")
    sk = np.take_along_axis(key, order, axis=1)
    sp = np.take_along_axis(np.where(valid, probs, 0.0), order, axis=1)
    run_end = np.ones((n, w), dtype=bool)
    run_end[:, :-1] = sk[:, 1:] != sk[:, :-1]
    running = np.cumsum(sp, axis=1)
    # Running sum just before each run starts (probabilities are >= 0, so it never decreases along a row).
    before = np.zeros((n, w))
    before[:, 1:] = np.where(run_end[:, :-1], running[:, :-1], 0.0)
    np.maximum.accumulate(before, axis=1, out=before)
    keep = run_end & (sk != _EMPTY_KEY)
    merged = np.where(keep, running - before, 0.0)
    total = merged.sum(axis=1, keepdims=True)
    merged /= np.where(total > 0, total, 1.0)
    # Best first; empties last; equal probabilities keep ascending id order (stable) for determinism.
    order = np.argsort(np.where(keep, -merged, 1.0), axis=1, kind="stable")
    out_ids = np.take_along_axis(np.where(keep, sk, -1), order, axis=1)
    out_p = np.take_along_axis(merged, order, axis=1)
    return out_ids, out_p


def _check_same_documents(shards: list[Shard]) -> None:
    ref = shards[0]
    for s in shards[1:]:
        if not np.array_equal(s["doc_index"], ref["doc_index"]):
            raise FusionError(
                f"{s.path}: documents differ from {ref.path} (doc_index); every candidate must "
                "cover the same documents: rerun align for this shard against the target"
            )
        if not np.array_equal(s["doc_offsets"], ref["doc_offsets"]):
            raise FusionError(
                f"{s.path}: positions differ from the target's {ref.path} (doc_offsets); "
                "aligned shards must be on the target's tokenization: rerun align"
            )


def _candidates(
    target: Shard, aligned: list[Shard], include_target: bool, top_k: int | None, fallback: str
) -> list[Candidate]:
    own = target_candidate(target)
    cands = ([own] if include_target else []) + [aligned_candidate(s) for s in aligned]
    for c in cands:
        c.top_k = top_k
        if fallback == "target" and c.shard is not target:
            c.fallback = own
    return cands


def _decision_ce(
    cands: list[Candidate], target: Shard, temperature: float, ce_unit: str, level: str, ce_on: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """What MinCE / AvgCE decide by: (CE [C, D] per document or [C, N] per row, eligibility per row)."""
    if ce_on == "target":
        return fused_view_ce(cands, target, temperature, ce_unit, level)
    if level == "sequence":
        return np.stack([sequence_ce(c, ce_unit) for c in cands]), None
    return np.stack([token_ce(c, ce_unit) for c in cands]), np.stack([c.eligible for c in cands])


def fuse_shard(
    target: Shard,
    aligned: list[Shard],
    strategy: str = "minCE",
    level: str = "sequence",
    ce_unit: str = "byte",
    temperature: float = 1.0,
    include_target: bool = True,
    top_k: int | None = None,
    ce_on: str = "own",
    fallback: str = "onehot",
) -> dict[str, np.ndarray]:
    """The arrays of a FUSED shard (fusion.format) from the target's extract shard and the sources'
    aligned shards. `choice` holds MinCE's candidate index per document (sequence) or per position
    (token), counted over the candidates used (the target is 0 when included); -1 for AvgCE.

    top_k: each candidate's distribution keeps only its k most likely stored entries (renormalised by
    the softmax), so k can be ablated below extraction's top-k without extracting again. With ce_on "own"
    MinCE's and AvgCE's decisions do not depend on it: they use the full-softmax gold log-probabilities.
    ce_on: "own" decides by each model's CE on its own tokenization (the paper); "target" by each
    candidate's CE on the target's tokens as it would be fused (fused_view_ce): a source strong on its
    own tokens can be weak once aligned, truncated and projected.
    fallback: where a source has no distribution (unaligned rows), "onehot" keeps its aligned shard's
    one-hot on the gold token (the CLM label again); "target" puts the target's own distribution there."""
    if strategy not in STRATEGIES:
        raise FusionError(f"fusion strategy {strategy!r} unknown; expected one of {STRATEGIES}")
    if level not in LEVELS:
        raise FusionError(f"fusion level {level!r} unknown; expected one of {LEVELS}")
    if ce_unit not in CE_UNITS:
        raise FusionError(f"fusion ceUnit {ce_unit!r} unknown; expected one of {CE_UNITS}")
    if not temperature > 0:
        raise FusionError(f"fusion temperature must be positive, got {temperature}")
    if top_k is not None and top_k < 1:
        raise FusionError(f"fusion topK must be at least 1, got {top_k}")
    if not include_target and not aligned:
        raise FusionError("nothing to fuse: includeTarget is false and there are no aligned sources")
    if ce_on not in CE_BASES or fallback not in FALLBACKS:
        raise FusionError(f"fusion ceOn {ce_on!r} / fallback {fallback!r}: expected {CE_BASES} / {FALLBACKS}")
    _check_same_documents([target, *aligned])
    cands = _candidates(target, aligned, include_target, top_k, fallback)
    if len(cands) > 127:
        raise FusionError(f"{len(cands)} candidates: choice is stored as int8, at most 127 are supported")

    offsets = np.asarray(target["doc_offsets"])
    lengths = np.diff(offsets)
    n = int(offsets[-1])
    # Decisions first, from per-document / per-row figures: which candidate (MinCE) or what weights (AvgCE).
    ce, eligible = _decision_ce(cands, target, temperature, ce_unit, level, ce_on)
    widths = [c.width for c in cands]
    per_row: np.ndarray | None = None  # MinCE: the candidate of each row
    weights: np.ndarray | None = None  # AvgCE: each candidate's weight [C, N]
    if strategy == "minCE":
        pick = np.argmin(ce, axis=0)  # first minimum: ties go to the lowest index (the target)
        per_row = np.repeat(pick, lengths) if level == "sequence" else pick
        choice = pick.astype(np.int8)
        out_width = max(widths)
    else:
        w = ce_weights(ce, eligible)
        weights = np.repeat(w, lengths, axis=1) if level == "sequence" else w  # [C, N]
        choice = np.full(len(lengths) if level == "sequence" else n, -1, dtype=np.int8)
        out_width = sum(widths)

    # Then the distributions, a block of rows at a time (memory bounded by the block, not the shard).
    out_ids, out_p = _distributions(cands, temperature, (n, out_width), per_row, weights)
    return {
        "doc_index": np.asarray(target["doc_index"]),
        "doc_offsets": offsets,
        "input_ids": np.asarray(target["input_ids"]),
        "target_ids": out_ids,
        "target_probs": out_p,
        "choice": choice,
    }


def _distributions(
    cands: list[Candidate],
    temperature: float,
    shape: tuple[int, int],
    per_row: np.ndarray | None,
    weights: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The fused (ids, probabilities) [N, width] of every row, a block of rows at a time: the chosen
    candidate's distribution per row (MinCE: per_row), else the weighted mixture of all (AvgCE: weights
    [C, N])."""
    n, out_width = shape
    out_ids = np.full((n, out_width), -1, dtype=np.int32)
    out_p = np.zeros((n, out_width), dtype=np.float16)
    for start in range(0, n, _BLOCK_ROWS):
        stop = min(n, start + _BLOCK_ROWS)
        blocks = [c.block(start, stop) for c in cands]
        probs = [softmax_rows(lp, temperature) for _, lp in blocks]
        if per_row is not None:
            ids_b = np.full((stop - start, out_width), -1, dtype=np.int32)
            p_b = np.zeros((stop - start, out_width))
            for j, ((ids, _), p) in enumerate(zip(blocks, probs, strict=True)):  # over candidates only
                rows = per_row[start:stop] == j
                ids_b[rows, : ids.shape[1]] = ids[rows]
                p_b[rows, : ids.shape[1]] = p[rows]
            p_b[ids_b < 0] = 0.0
        else:
            assert weights is not None
            ids_all = np.concatenate([ids for ids, _ in blocks], axis=1)
            p_all = np.concatenate([p * weights[j, start:stop, None] for j, p in enumerate(probs)], axis=1)
            ids_b, p_b = merge_rows(ids_all, p_all)
        out_ids[start:stop] = ids_b
        out_p[start:stop] = p_b
    return out_ids, out_p
