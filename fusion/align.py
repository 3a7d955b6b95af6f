"""Token alignment: one source model's predictions moved onto the target's positions and vocabulary.

1. DTW of the two tokenizations of the same document. Cost c(i, j) = Levenshtein distance between the bytes
   of source token i and target token j (rapidfuzz cdist, C++); D[i, j] = c(i, j) + min(D[i-1, j],
   D[i, j-1], D[i-1, j-1]). Row i is computed from row i-1 with whole-row numpy operations (no Python loop
   over cells): with E[j] = min(D[i-1, j], D[i-1, j-1]) (the moves that enter row i) and C the running sum of
   row i's costs, unrolling the left moves gives
       D[i, j] = C[j] + min_{k <= j} (E[k] - C[k-1])          (C[-1] = 0)
   i.e. a cumulative sum and a cumulative minimum (np.minimum.accumulate). The backtrack starts at
   (n-1, m-1) and prefers the diagonal, then the source step (i-1), then the target step (j-1); it is
   O(n + m).
2. Target position t is 1:1 when exactly one source position s is paired with it and s with no other
   target position. It is accepted when (EM) both tokens stand for the same bytes, or (MinED) also when the
   vocabulary map sends the source token onto the target token.
3. An accepted row t takes the source's top-k at s, mapped into the target vocabulary (EM: exact matches
   only; MinED: through the map), unmapped entries dropped, duplicates merged keeping the highest
   log-prob, best first, padded with -1 / -inf. Any other row is a one-hot on the NEXT gold target token
   input_ids[t+1] with log-prob 0 (the reference put it on the current token: defect 1). The last row of
   a document predicts nothing: all empty, aligned = 0.

The exact method (fusion.exact) pairs rows by byte offsets in the text instead, and projects distributions by
what tokens spell (fusion.project); it writes the same aligned shard.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from operator import eq, methodcaller
from typing import Any

import numpy as np

from fusion.format import Shard
from fusion.tokens import TokenizerView
from fusion.vocab import METHODS, VocabMap

# Every alignment method: the two of the paper (DTW + a vocabulary map, fusion.vocab) and exact (byte-offset
# pairing + projection by spelling, fusion.exact / fusion.project).
_ROWS_PER_BLOCK = 1 << 16  # accepted rows mapped at a time: [rows, k, k] bool masks stay <= 64 MB (k <= 32)


class AlignmentError(ValueError):
    """Shards or maps that cannot be aligned together."""


# --------------------------------------------------------------------------------------------------
# DTW


def token_costs(src_text: list[str], tgt_text: list[str], workers: int = 1) -> np.ndarray:
    """int32 [n, m] Levenshtein distances between tokens given as latin-1 strings (one char per byte)."""
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    return process.cdist(src_text, tgt_text, scorer=Levenshtein.distance, dtype=np.int32, workers=workers)


def dtw_matrix(cost: np.ndarray) -> np.ndarray:
    """The accumulated-cost matrix D [n, m] of a cost matrix, row by row with numpy."""
    cost = np.asarray(cost)
    n, m = cost.shape
    if n == 0 or m == 0:
        return np.empty((n, m), dtype=np.int64)
    # D on the path is at most (n + m) * max cost; C (row sums) at most m * max cost: int32 when they fit.
    bound = (n + m) * int(max(cost.max(), 0))
    cost = cost.astype(np.int32 if bound < 2**30 else np.int64)
    acc = np.empty((n, m), dtype=cost.dtype)
    csum = np.cumsum(cost, axis=1)  # C[i, j]
    before = csum - cost  # C[i, j-1] (0 in column 0)
    acc[0] = csum[0]  # first row: only left moves
    for i in range(1, n):
        prev, row = acc[i - 1], acc[i]
        row[0] = prev[0]
        np.minimum(prev[1:], prev[:-1], out=row[1:])  # E: up or diagonal into each column
        row -= before[i]
        np.minimum.accumulate(row, out=row)
        row += csum[i]
    return acc


def dtw_backtrack(acc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Path from (0, 0) to (n-1, m-1) through D; ties prefer the diagonal, then i-1, then j-1."""
    n, m = acc.shape
    i, j = n - 1, m - 1
    src_path, tgt_path = [i], [j]
    cell = acc.item  # the O(n + m) walk reads single cells as Python ints
    while i > 0 or j > 0:
        if i > 0 and j > 0:
            diag, up, left = cell(i - 1, j - 1), cell(i - 1, j), cell(i, j - 1)
            if diag <= up and diag <= left:
                i, j = i - 1, j - 1
            elif up <= left:
                i -= 1
            else:
                j -= 1
        elif i > 0:
            i -= 1
        else:
            j -= 1
        src_path.append(i)
        tgt_path.append(j)
    return np.array(src_path[::-1], dtype=np.int64), np.array(tgt_path[::-1], dtype=np.int64)


def dtw_align(src_bytes: list[bytes], tgt_bytes: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """DTW path between two token sequences of the same text, as (source index, target index) arrays."""
    if not src_bytes or not tgt_bytes:
        raise ValueError("dtw_align: both token sequences must be non-empty")
    latin1 = methodcaller("decode", "latin-1")
    return dtw_path_from_text(list(map(latin1, src_bytes)), list(map(latin1, tgt_bytes)))


def dtw_path_from_text(src_text: list[str], tgt_text: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return dtw_backtrack(dtw_matrix(token_costs(src_text, tgt_text)))


def one_to_one(src_path: np.ndarray, tgt_path: np.ndarray, n_src: int, n_tgt: int) -> np.ndarray:
    """int64 [n_tgt]: the source position paired 1:1 with each target position, else -1."""
    tgt_count = np.bincount(tgt_path, minlength=n_tgt)
    src_count = np.bincount(src_path, minlength=n_src)
    single = (tgt_count[tgt_path] == 1) & (src_count[src_path] == 1)
    out = np.full(n_tgt, -1, dtype=np.int64)
    out[tgt_path[single]] = src_path[single]
    return out


# --------------------------------------------------------------------------------------------------
# Shard transform


@dataclass
class AlignStats:
    """How much of a source's signal reached the target's positions (for reports)."""

    documents: int = 0
    positions: int = 0  # target rows that predict a token (all rows but each document's last)
    one_to_one: int = 0  # of those, rows whose DTW pair is 1:1
    aligned: int = 0  # of those, accepted (rows carrying the source's distribution)
    exact: int = 0  # of the accepted, pairs of tokens with identical bytes
    entries: int = 0  # non-empty top-k entries over accepted rows (after mapping and merging)
    source_entries: int = 0  # top-k entries of the source at those rows before mapping

    @property
    def aligned_fraction(self) -> float:
        return self.aligned / self.positions if self.positions else 0.0

    @property
    def exact_fraction(self) -> float:
        return self.exact / self.positions if self.positions else 0.0

    @property
    def kept_entry_fraction(self) -> float:
        return self.entries / self.source_entries if self.source_entries else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "aligned_fraction": self.aligned_fraction,
            "exact_fraction": self.exact_fraction,
            "kept_entry_fraction": self.kept_entry_fraction,
        }


def needed_source_ids(src: Shard) -> np.ndarray:
    """Source ids a vocabulary map must cover to align this extract shard (lazy maps)."""
    ids = np.concatenate([np.asarray(src["topk_ids"]).ravel(), np.asarray(src["input_ids"]).ravel()])
    ids = np.unique(ids.astype(np.int64))
    return ids[ids >= 0]


def _document_order(src: Shard, tgt: Shard) -> np.ndarray:
    """For each target document, the index of the same document (doc_index) in the source shard."""
    tgt_docs = np.asarray(tgt["doc_index"])
    src_docs = np.asarray(src["doc_index"])
    if np.array_equal(tgt_docs, src_docs):
        return np.arange(len(tgt_docs))
    order = np.argsort(src_docs, kind="stable")
    pos = np.searchsorted(src_docs[order], tgt_docs).clip(0, max(len(src_docs) - 1, 0))
    found = len(src_docs) > 0 and np.array_equal(src_docs[order][pos], tgt_docs)
    if not found or len(src_docs) != len(tgt_docs) or len(np.unique(src_docs)) != len(src_docs):
        missing = sorted(set(tgt_docs.tolist()) ^ set(src_docs.tolist()))[:5]
        raise AlignmentError(
            f"source shard {src.path} and target shard {tgt.path} hold different documents "
            f"(doc_index differs, e.g. {missing}); extract both from the same prepared shard"
        )
    return order[pos]


def align_shard(
    src: Shard, tgt: Shard, src_view: TokenizerView, tgt_view: TokenizerView, vocab_map: VocabMap, method: str
) -> dict[str, np.ndarray]:
    """The arrays of an aligned shard (see fusion.format) for one source against the target."""
    return align_shard_with_stats(src, tgt, src_view, tgt_view, vocab_map, method)[0]


def align_shard_with_stats(
    src: Shard, tgt: Shard, src_view: TokenizerView, tgt_view: TokenizerView, vocab_map: VocabMap, method: str
) -> tuple[dict[str, np.ndarray], AlignStats]:
    arrays, stats, _, _ = align_shard_dtw(src, tgt, src_view, tgt_view, vocab_map, method)
    return arrays, stats


def align_shard_dtw(
    src: Shard, tgt: Shard, src_view: TokenizerView, tgt_view: TokenizerView, vocab_map: VocabMap, method: str
) -> tuple[dict[str, np.ndarray], AlignStats, np.ndarray, np.ndarray]:
    """align_shard_with_stats, plus the target rows that carry the source's distribution and the source
    rows they took it from (for fusion.exact's diagnostics)."""
    src_topk, src_input, tgt_input = _checked_ids(src, tgt, src_view, tgt_view, vocab_map, method)
    order = _document_order(src, tgt)
    src_off = np.asarray(src["doc_offsets"])
    tgt_off = np.asarray(tgt["doc_offsets"])
    n_tgt = int(tgt_off[-1])
    pair = _dtw_pairs(src, tgt, order, (src_input, tgt_input), (src_view, tgt_view))

    is_last = np.zeros(n_tgt, dtype=bool)
    is_last[tgt_off[1:] - 1] = True
    src_last = np.zeros(len(src_input), dtype=bool)
    src_last[src_off[1:] - 1] = True
    rows = np.flatnonzero((pair >= 0) & ~is_last)
    rows = rows[~src_last[pair[rows]]]  # a source row that predicts nothing has nothing to give
    s_rows = pair[rows]
    same = np.fromiter(
        map(eq, src_view.bytes_of(src_input[s_rows]), tgt_view.bytes_of(tgt_input[rows])),
        dtype=bool,
        count=len(rows),
    )
    accept = same if method == "em" else same | (vocab_map.lookup(src_input[s_rows]) == tgt_input[rows])
    one_to_one_rows = len(rows)
    rows, s_rows, same = rows[accept], s_rows[accept], same[accept]

    k = src_topk.shape[1]
    src_lp = np.asarray(src["topk_logprobs"])
    mapped_ids = np.empty((len(s_rows), k), dtype=np.int32)
    mapped_lp = np.empty((len(s_rows), k), dtype=np.float32)
    for lo in range(0, len(s_rows), _ROWS_PER_BLOCK):  # bounds the [rows, k, k] duplicate masks
        block = s_rows[lo : lo + _ROWS_PER_BLOCK]
        mapped_ids[lo : lo + len(block)], mapped_lp[lo : lo + len(block)] = map_topk(
            src_topk[block], src_lp[block], vocab_map, exact_only=(method == "em")
        )
    # An accepted row none of whose entries survive mapping (EM, rare) carries nothing: it falls back.
    kept = mapped_ids[:, 0] >= 0
    rows, s_rows, same = rows[kept], s_rows[kept], same[kept]
    mapped_ids, mapped_lp = mapped_ids[kept], mapped_lp[kept]
    arrays = aligned_arrays(src, tgt, order, rows, s_rows, mapped_ids, mapped_lp)
    stats = AlignStats(
        documents=len(order),
        positions=int(n_tgt - len(order)),
        one_to_one=one_to_one_rows,
        aligned=len(rows),
        exact=int(same.sum()),
        entries=int((mapped_ids >= 0).sum()),
        source_entries=int((src_topk[s_rows] >= 0).sum()),
    )
    return arrays, stats, rows, s_rows


def _checked_ids(
    src: Shard, tgt: Shard, src_view: TokenizerView, tgt_view: TokenizerView, vocab_map: VocabMap, method: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The source's top-k ids, the source's and the target's token ids (int64), once the method, the
    vocabulary map and the ids are known to fit together; AlignmentError naming what does not."""
    if method == "exact":
        raise AlignmentError(
            "alignment method 'exact' takes no vocabulary map: use fusion.exact.align_shard_exact with a "
            "fusion.project.Projection"
        )
    if method not in METHODS:
        raise AlignmentError(f"alignment method {method!r}: expected one of {METHODS}")
    if method == "mined" and vocab_map.method != "mined":
        raise AlignmentError("MinED alignment needs a MinED vocabulary map; this one was built with EM")
    vocab_map.check(src_view, tgt_view)
    src_topk = np.asarray(src["topk_ids"]).astype(np.int64)
    src_input = np.asarray(src["input_ids"]).astype(np.int64)
    tgt_input = np.asarray(tgt["input_ids"]).astype(np.int64)
    for name, ids, view in (
        ("source", src_input, src_view),
        ("source top-k", src_topk, src_view),
        ("target", tgt_input, tgt_view),
    ):
        if ids.size and ids.max() >= view.vocab_size:
            raise AlignmentError(
                f"{name} ids reach {int(ids.max())}, beyond {view.name}'s {view.vocab_size} "
                "tokens: the shard was extracted with another tokenizer"
            )
    needed = needed_source_ids(src)
    not_computed = vocab_map.missing(needed)
    if not_computed.size:
        raise AlignmentError(
            f"vocabulary map lacks {not_computed.size} source ids of {src.path} (e.g. "
            f"{not_computed[:5].tolist()}); build it with src_ids=needed_source_ids(shard)"
        )
    return src_topk, src_input, tgt_input


def _dtw_pairs(
    src: Shard,
    tgt: Shard,
    order: np.ndarray,
    ids: tuple[np.ndarray, np.ndarray],
    views: tuple[TokenizerView, TokenizerView],
) -> np.ndarray:
    """The global source row paired 1:1 with each target row (-1: none), document by document along the
    DTW path of the two tokenizations' texts. ids, views: the source's and the target's."""
    (src_input, tgt_input), (src_view, tgt_view) = ids, views
    src_off = np.asarray(src["doc_offsets"])
    tgt_off = np.asarray(tgt["doc_offsets"])
    pair = np.full(int(tgt_off[-1]), -1, dtype=np.int64)
    src_text, tgt_text = src_view.token_text, tgt_view.token_text
    for d, sd in enumerate(order.tolist()):
        s0, s1 = int(src_off[sd]), int(src_off[sd + 1])
        t0, t1 = int(tgt_off[d]), int(tgt_off[d + 1])
        if s1 == s0 or t1 == t0:
            raise AlignmentError(f"document {int(tgt['doc_index'][d])} has no tokens in one of the shards")
        sp, tp = dtw_path_from_text(
            list(map(src_text.__getitem__, src_input[s0:s1].tolist())),
            list(map(tgt_text.__getitem__, tgt_input[t0:t1].tolist())),
        )
        local = one_to_one(sp, tp, s1 - s0, t1 - t0)
        pair[t0:t1] = np.where(local >= 0, local + s0, -1)
    return pair


def aligned_arrays(
    src: Shard,
    tgt: Shard,
    order: np.ndarray,
    rows: np.ndarray,
    s_rows: np.ndarray,
    topk_ids: np.ndarray,
    topk_logprobs: np.ndarray,
) -> dict[str, np.ndarray]:
    """The arrays of an aligned shard: target rows `rows` carry the source's mapped top-k (taken at source
    rows `s_rows`, non-empty); every other row but each document's last is a one-hot on its NEXT gold target
    token (row t predicts token t+1) with log-prob 0; last rows are empty. order: as _document_order."""
    tgt_off = np.asarray(tgt["doc_offsets"])
    tgt_input = np.asarray(tgt["input_ids"]).astype(np.int64)
    n_tgt = int(tgt_off[-1])
    is_last = np.zeros(n_tgt, dtype=bool)
    is_last[tgt_off[1:] - 1] = True
    k = np.asarray(src["topk_ids"]).shape[1]
    out_ids = np.full((n_tgt, k), -1, dtype=np.int32)
    out_lp = np.full((n_tgt, k), -np.inf, dtype=np.float32)
    out_ids[rows] = topk_ids
    out_lp[rows] = topk_logprobs
    aligned = np.zeros(n_tgt, dtype=np.uint8)
    aligned[rows] = 1
    fallback = np.flatnonzero(~is_last & (aligned == 0))
    out_ids[fallback, 0] = tgt_input[fallback + 1]
    out_lp[fallback, 0] = 0.0
    gold_lp = np.full(n_tgt, np.nan, dtype=np.float16)
    gold_lp[rows] = np.asarray(src["gold_logprob"])[s_rows]
    gold_nbytes = np.zeros(n_tgt, dtype=np.uint16)
    gold_nbytes[rows] = np.asarray(src["token_nbytes"])[s_rows + 1]
    return {
        "doc_index": np.asarray(tgt["doc_index"]).astype(np.int64),
        "doc_offsets": tgt_off.astype(np.int64),
        "topk_ids": out_ids,
        "topk_logprobs": out_lp.astype(np.float16),
        "aligned": aligned,
        "gold_logprob": gold_lp,
        "gold_nbytes": gold_nbytes,
        "doc_nll": np.asarray(src["doc_nll"])[order].astype(np.float32),
        "doc_pred_nbytes": np.asarray(src["doc_pred_nbytes"])[order].astype(np.int64),
        "doc_n_pred": np.asarray(src["doc_n_pred"])[order].astype(np.int32),
    }


def map_topk(
    ids: np.ndarray, logprobs: np.ndarray, vocab_map: VocabMap, exact_only: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Map [R, k] source top-k rows into the target vocabulary, vectorised over rows.

    Unmapped entries are dropped; entries that land on the same target id are merged keeping the highest
    log-prob; each row is sorted best first and padded with -1 / -inf. Returns (int32 ids, float32 lp)."""
    lp = np.asarray(logprobs, dtype=np.float32)
    mapped = vocab_map.lookup(ids, exact_only=exact_only).astype(np.int64)
    lp = np.where(mapped >= 0, lp, -np.inf)
    lp = np.where(np.isnan(lp), -np.inf, lp)
    # Best first, so "keep the highest log-prob" = keep the first occurrence of an id in the row.
    order = np.argsort(-lp, axis=1, kind="stable")
    mapped = np.take_along_axis(mapped, order, axis=1)
    lp = np.take_along_axis(lp, order, axis=1)
    k = mapped.shape[1]
    earlier = np.tril(np.ones((k, k), dtype=bool), -1)  # [j, j']: j' < j
    dup = ((mapped[:, :, None] == mapped[:, None, :]) & earlier).any(axis=2) & (mapped >= 0)
    empty = dup | (mapped < 0) | np.isneginf(lp)  # probability 0 is no entry
    mapped = np.where(empty, -1, mapped)
    lp = np.where(empty, -np.inf, lp)
    order = np.argsort(empty, axis=1, kind="stable")  # keep the best-first order, empties last
    return (np.take_along_axis(mapped, order, axis=1).astype(np.int32), np.take_along_axis(lp, order, axis=1))
