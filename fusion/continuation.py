"""Continuation-aware projection: a source token that the target's own candidates extend shares its
probability among them.

Exact pairing gives a target row the source's distribution over its next tokens at the same byte. A source
token is the start of a continuation; the target may spell that continuation with a longer token. Gemma's
' re' (p 0.6) is the start of ' return' and ' result', which SmolLM2 has as single tokens: projecting ' re'
onto the target token that spells it (' re') puts 0.6 on a token the target would never emit there, and
the gold ' return' gets nothing. Here the source decides how much mass the continuation gets (0.6) and
the target's own distribution at the same row decides how it splits into its longer tokens:

    target row: ' return' 0.30, ' result' 0.10, ' re' 0.00 (absent), ' x' 0.50
    source row: ' re' 0.60, ' x' 0.40
    projected:  ' return' 0.6 * 0.30 / 0.40 = 0.45, ' result' 0.15, ' x' 0.40

A source entry is split when at least one of the target's entries at that row strictly extends its text
(same leading bytes, longer); its share goes to those entries and to the token it spells if the target holds
that one too, in proportion to the target's probabilities. Every other entry keeps its spelled projection.
Only rows in mode 0 (neither side at a document start, where a dummy space changes what tokens spell) are
split. Token texts are compared on their first BYTES_COMPARED bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fusion.tokens import TokenizerView

BYTES_COMPARED = 32  # tokens are compared on this many leading bytes (longer tokens are rare)
_ROWS_PER_BLOCK = 2048  # the [rows, k_src, k_tgt, bytes] comparison stays ~ 2048 * 10 * 10 * 32 = 6.5 MB


@dataclass(frozen=True)
class ByteTable:
    """Every token's leading bytes, zero-padded: bytes uint8 [vocab, BYTES_COMPARED], lengths int32 [vocab]
    (0 for tokens that stand for no text)."""

    bytes: np.ndarray
    lengths: np.ndarray

    @classmethod
    def of(cls, view: TokenizerView) -> ByteTable:
        lengths = view.nbytes.astype(np.int64)
        blob = np.frombuffer(b"".join(view.token_bytes), dtype=np.uint8)
        starts = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        kept = np.minimum(lengths, BYTES_COMPARED)
        table = np.zeros((len(lengths), BYTES_COMPARED), dtype=np.uint8)
        row = np.repeat(np.arange(len(lengths)), kept)
        col = np.arange(int(kept.sum())) - np.repeat(np.cumsum(kept) - kept, kept)
        table[row, col] = blob[starts[row] + col]
        return cls(bytes=table, lengths=lengths.astype(np.int32))


def split_by_target(
    proj_ids: np.ndarray,
    src_ids: np.ndarray,
    src_logprobs: np.ndarray,
    tgt_ids: np.ndarray,
    tgt_logprobs: np.ndarray,
    src_table: ByteTable,
    tgt_table: ByteTable,
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """[R, Ks] projected target ids (-1 dropped) and the source's log-probs, the source ids they came from,
    and the target's own [R, Kt] entries at the same rows -> [R, Ks + Kt] target ids and log-probs with
    every source entry the target extends split as the module says (not merged: fusion.project's
    sum_duplicates merges repeated ids). rows: bool [R], the rows that may be split (default all)."""
    n = proj_ids.shape[0]
    out_ids = np.concatenate([proj_ids, np.where(tgt_ids >= 0, tgt_ids, -1)], axis=1).astype(np.int32)
    out_p = np.zeros(out_ids.shape, dtype=np.float64)
    for lo in range(0, n, _ROWS_PER_BLOCK):
        hi = min(n, lo + _ROWS_PER_BLOCK)
        may = np.ones(hi - lo, dtype=bool) if rows is None else np.asarray(rows[lo:hi], dtype=bool)
        out_p[lo:hi] = _split_block(
            proj_ids[lo:hi], src_ids[lo:hi], src_logprobs[lo:hi], tgt_ids[lo:hi], tgt_logprobs[lo:hi],
            src_table, tgt_table, may,
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
    src_table: ByteTable,
    tgt_table: ByteTable,
    may: np.ndarray,
) -> np.ndarray:
    """Probabilities [B, Ks + Kt]: the source entries' kept share, then what the target's entries got."""
    p_src = _probs(np.where(proj_ids >= 0, src_ids, -1), src_lp)  # dropped by the projection: nothing
    p_tgt = _probs(tgt_ids, tgt_lp)
    s_safe, t_safe = np.maximum(src_ids, 0), np.maximum(tgt_ids, 0)
    len_s = np.where(src_ids >= 0, np.minimum(src_table.lengths[s_safe], BYTES_COMPARED), 0)
    len_t = np.where(tgt_ids >= 0, tgt_table.lengths[t_safe], 0)
    # same[b, j, i]: the first len_s[b, j] bytes of target entry i are those of source entry j.
    equal = src_table.bytes[s_safe][:, :, None, :] == tgt_table.bytes[t_safe][:, None, :, :]
    within = np.arange(BYTES_COMPARED) < len_s[:, :, None, None]
    prefix = (equal | ~within).all(axis=3)
    extends = prefix & (len_t[:, None, :] > len_s[:, :, None]) & (len_s[:, :, None] > 0)
    extends &= (p_tgt[:, None, :] > 0) & (p_src[:, :, None] > 0) & may[:, None, None]
    spelled = (tgt_ids[:, None, :] == proj_ids[:, :, None]) & (proj_ids[:, :, None] >= 0)
    split = extends.any(axis=2)
    share = np.where((extends | spelled) & split[:, :, None], p_tgt[:, None, :], 0.0)  # [B, Ks, Kt]
    share /= np.maximum(share.sum(axis=2, keepdims=True), 1e-300)
    to_target = np.einsum("bj,bji->bi", p_src, share)
    return np.concatenate([np.where(split, 0.0, p_src), to_target], axis=1)
