"""Continuation-aware projection: a source token whose continuations the target spells as longer tokens shares
its probability among those tokens.

Exact pairing gives a target row the source's distribution over its next tokens at the same byte. A source
token is the start of a continuation; the target may spell that continuation with a longer token. Say the
source has ' re' but no ' return' or ' result', which the target has as single tokens: the spelling
projection puts the source's p(' re') on the target's ' re', a token the target never emits before 'turn',
and the gold ' return' gets nothing. Here the source decides how much mass the continuation gets and the
target's own distribution at the same row decides how it splits into the target's longer tokens:

    target row: ' return' 0.30, ' result' 0.10, ' x' 0.50
    source row: ' re' 0.60, ' x' 0.40
    projected:  ' return' 0.6 * 0.30 / 0.40 = 0.45, ' result' 0.15, ' x' 0.40

Which target tokens continue a source token is decided by the source's own tokenizer: target token t
continues source token s when the source tokenizer, encoding t's text, emits s first (`first_source`: the
reverse projection, fusion.project.build_projection with the roles swapped). A source that has ' return'
itself encodes ' return' as ' return', so its p(' re') is not mass for ' return' (it said ' return'
separately) and stays on the spelled ' re'. A source entry is split when the target's entries at the row
hold at least one token that continues it; its share goes to those and to the token it spells if the target
holds that one too, in proportion to the target's probabilities. Only rows in mode 0 (neither side at a
document start, where a dummy space changes what tokens spell) are split.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fusion.project import build_projection

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_ROWS_PER_BLOCK = 1 << 14  # the [rows, k_src, k_tgt] masks stay ~ 16384 * 10 * 10 = 1.6 M entries


def first_source_tokens(
    src_tok: PreTrainedTokenizerBase, tgt_tok: PreTrainedTokenizerBase, tgt_ids: np.ndarray
) -> np.ndarray:
    """int32 [target vocab]: for each of tgt_ids, the source id the source tokenizer emits first for that
    target token's text inside a document (-1 elsewhere): the projection with the roles swapped."""
    return build_projection(tgt_tok, src_tok, tgt_ids).ids[0]


def split_by_target(
    proj_ids: np.ndarray,
    src_ids: np.ndarray,
    src_logprobs: np.ndarray,
    tgt_ids: np.ndarray,
    tgt_logprobs: np.ndarray,
    first_source: np.ndarray,
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """[R, Ks] projected target ids (-1 dropped) with the source ids they came from and the source's
    log-probs, and the target's own [R, Kt] entries at the same rows -> [R, Ks + Kt] target ids and
    log-probs with every source entry the target continues split as the module says (not merged:
    fusion.project.sum_duplicates merges repeated ids).

    first_source: int [target vocab], the source id the source tokenizer emits first for each target
    token's text (-1: not computed or none). rows: bool [R], the rows that may be split (default all)."""
    n = proj_ids.shape[0]
    out_ids = np.concatenate([proj_ids, np.where(tgt_ids >= 0, tgt_ids, -1)], axis=1).astype(np.int32)
    out_p = np.zeros(out_ids.shape, dtype=np.float64)
    for lo in range(0, n, _ROWS_PER_BLOCK):
        hi = min(n, lo + _ROWS_PER_BLOCK)
        may = np.ones(hi - lo, dtype=bool) if rows is None else np.asarray(rows[lo:hi], dtype=bool)
        out_p[lo:hi] = _split_block(
            proj_ids[lo:hi], src_ids[lo:hi], src_logprobs[lo:hi], tgt_ids[lo:hi], tgt_logprobs[lo:hi],
            first_source, may,
        )  # fmt: skip
    with np.errstate(divide="ignore"):
        out_lp = np.where(out_p > 0, np.log(np.maximum(out_p, 1e-300)), -np.inf).astype(np.float32)
    return np.where(out_p > 0, out_ids, -1).astype(np.int32), out_lp


def _probs(ids: np.ndarray, logprobs: np.ndarray) -> np.ndarray:
    lp = np.asarray(logprobs, dtype=np.float64)
    live = (ids >= 0) & np.isfinite(lp)
    return np.where(live, np.exp(np.where(live, lp, 0.0)), 0.0)


def _split_block(
    proj_ids: np.ndarray,
    src_ids: np.ndarray,
    src_lp: np.ndarray,
    tgt_ids: np.ndarray,
    tgt_lp: np.ndarray,
    first_source: np.ndarray,
    may: np.ndarray,
) -> np.ndarray:
    """Probabilities [B, Ks + Kt]: the source entries' kept share, then what the target's entries got."""
    p_src = _probs(np.where(proj_ids >= 0, src_ids, -1), src_lp)  # dropped by the projection: nothing
    p_tgt = _probs(tgt_ids, tgt_lp)
    starts_with = np.where(tgt_ids >= 0, first_source[np.maximum(tgt_ids, 0)], -1)  # [B, Kt] source ids
    spelled = (tgt_ids[:, None, :] == proj_ids[:, :, None]) & (proj_ids[:, :, None] >= 0)
    continues = (starts_with[:, None, :] == src_ids[:, :, None]) & (src_ids[:, :, None] >= 0) & ~spelled
    continues &= (p_tgt[:, None, :] > 0) & (p_src[:, :, None] > 0) & may[:, None, None]
    split = continues.any(axis=2)
    share = np.where((continues | spelled) & split[:, :, None], p_tgt[:, None, :], 0.0)  # [B, Ks, Kt]
    share /= np.maximum(share.sum(axis=2, keepdims=True), 1e-300)
    to_target = np.einsum("bj,bji->bi", p_src, share)
    return np.concatenate([np.where(split, 0.0, p_src), to_target], axis=1)
