"""Exact alignment: source rows paired with target rows by byte offsets in the documents' text.

Row t of an extract shard predicts token t+1 from the text before byte b_t, the end of token t in the
document. The source row s with the same end (b_s = b_t) predicts the next token from exactly the same text,
so its distribution, projected onto the target vocabulary by spelling (`fusion.project`), is the source's
prediction for the target's next token. Both shards tokenize the same text, so pairing is a merge of sorted
end offsets (np.searchsorted over the whole shard; no DP, no per-token Python).

What real tokenizers do, and how it is handled:
  special tokens (BOS, EOS)    stand for 0 bytes: a BOS row ends at byte 0 (the empty prefix); the row of
                               the last text token ends at the end of the text and predicts EOS
  SentencePiece dummy prefix   'Hello' -> '▁Hello' spells b' Hello': detected per document (the tokens spell
                               b' ' + text) and the byte is not counted; the rows before it (BOS) are "at
                               start" (fusion.project modes)
  byte fallback, partial UTF-8 tokens are bytes; a boundary inside a character is a boundary like any other
  normalisation (NFKC, ...)    tokens stop spelling the text: per document, only rows whose prefix lies in
                               the identical leading bytes (of both tokenizations) are paired; the rest is
                               counted (`lost_normalised`), never guessed
When several source rows end at the same byte (BOS, then a lone dummy '▁'), the last one is taken: it has
seen every token before the next text. A row without a source row at its byte gets the fallback, a one-hot
on its next gold target token, as the DTW methods do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fusion.align import (
    AlignmentError,
    AlignStats,
    _document_order,
    align_shard_dtw,
    aligned_arrays,
    needed_source_ids,
)
from fusion.continuation import split_by_target
from fusion.format import Shard
from fusion.project import SPECIAL, Projection, mode_index, sum_duplicates
from fusion.tokens import TokenizerView
from fusion.vocab import VocabMap

_EXAMPLES = 5  # normalised documents named in the diagnostics


# --------------------------------------------------------------------------------------------------
# Documents: how each tokenization spells its text


def text_order(
    doc_index: np.ndarray, doc_text: np.ndarray, doc_text_offsets: np.ndarray, doc_text_index: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(start, stop) byte offsets in doc_text of each document of `doc_index`, checking the text arrays."""
    text, offsets = np.asarray(doc_text), np.asarray(doc_text_offsets, dtype=np.int64)
    index = np.asarray(doc_text_index, dtype=np.int64)
    if text.ndim != 1 or text.dtype != np.uint8:
        raise AlignmentError(
            f"doc_text: expected the prepared shard's 1-D uint8 text, got {text.dtype} {text.shape}"
        )
    if (
        offsets.ndim != 1
        or len(offsets) != len(index) + 1
        or (len(offsets) and (offsets[0] != 0 or offsets[-1] != len(text) or np.any(np.diff(offsets) < 0)))
    ):
        raise AlignmentError(
            "doc_text_offsets: expected len(doc_text_index) + 1 non-decreasing byte offsets from 0 to "
            "len(doc_text) (the prepared shard's doc_offsets)"
        )
    if len(np.unique(index)) != len(index):
        raise AlignmentError("doc_text_index: document ids repeat; pass the prepared shard's doc_index")
    doc_index = np.asarray(doc_index)
    missing = doc_index[~np.isin(doc_index, index)]
    if len(missing):
        raise AlignmentError(
            f"doc_text_index lacks documents {missing[:5].tolist()} of the shards; pass the prepared shard "
            "the extract shards were made from"
        )
    sorter = np.argsort(index, kind="stable")
    found = sorter[np.searchsorted(index, doc_index, sorter=sorter)]
    return offsets[found].astype(np.int64), offsets[found + 1].astype(np.int64)


@dataclass(frozen=True)
class Spelling:
    """How one shard's tokens spell its documents' text, per document (in the shard's order)."""

    skip: np.ndarray  # int64 [D]: 1 when the tokens carry a dummy space the text lacks, else 0
    agree: np.ndarray  # int64 [D]: leading text bytes the tokens spell identically
    full: np.ndarray  # bool [D]: the tokens spell exactly the text (after the dummy)

    def take(self, order: np.ndarray) -> Spelling:
        return Spelling(self.skip[order], self.agree[order], self.full[order])


def common_prefix(a: bytes, b: bytes) -> int:
    """Length of the longest common prefix of two byte strings (memcmp first, numpy on a mismatch)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    x, y = np.frombuffer(a, np.uint8, n), np.frombuffer(b, np.uint8, n)
    return int(np.argmax(x != y))


def spell_document(spelled: bytes, text: bytes) -> tuple[int, int, bool]:
    """(skip, agree, full) of one document: whether a leading dummy space explains the tokens better."""
    if spelled == text:
        return 0, len(text), True
    if spelled[:1] == b" " and spelled[1:] == text:
        return 1, len(text), True
    plain = common_prefix(spelled, text)
    dummy = common_prefix(spelled[1:], text) if spelled[:1] == b" " else -1
    return (1, dummy, False) if dummy > plain else (0, plain, False)


def spelling(
    view: TokenizerView,
    input_ids: np.ndarray,
    offsets: np.ndarray,
    text: bytes,
    starts: np.ndarray,
    stops: np.ndarray,
) -> Spelling:
    """Compare each document's token bytes with its text (text[starts[d]:stops[d]]).

    One Python step per document (the byte comparisons run in C), none per token."""
    blob = view.decode(input_ids)
    ends = np.zeros(len(input_ids) + 1, dtype=np.int64)
    np.cumsum(view.nbytes[input_ids], out=ends[1:])
    at = ends[offsets].tolist()
    lo, hi = starts.tolist(), stops.tolist()
    rows = [spell_document(blob[at[d] : at[d + 1]], text[lo[d] : hi[d]]) for d in range(len(lo))]
    skip, agree, full = zip(*rows, strict=True) if rows else ((), (), ())
    return Spelling(
        np.array(skip, dtype=np.int64), np.array(agree, dtype=np.int64), np.array(full, dtype=bool)
    )


@dataclass(frozen=True)
class RowEnds:
    """Per row of a shard: the byte of its document's text where its prefix ends, and whether the
    tokenizer's dummy space is still pending there (no text token yet in a dummy-prefixed document)."""

    end: np.ndarray  # int64 [N]
    at_start: np.ndarray  # bool [N]
    doc: np.ndarray  # int64 [N]: document of each row (shard order)
    last: np.ndarray  # bool [N]: the last row of its document (predicts nothing)


def row_ends(view: TokenizerView, input_ids: np.ndarray, offsets: np.ndarray, skip: np.ndarray) -> RowEnds:
    lengths = np.diff(offsets)
    doc = np.repeat(np.arange(len(lengths)), lengths)
    ends = np.zeros(len(input_ids) + 1, dtype=np.int64)
    np.cumsum(view.nbytes[input_ids], out=ends[1:])
    raw = ends[1:] - ends[offsets[:-1]][doc]  # bytes the document's tokens 0..t spell, dummy included
    last = np.zeros(len(input_ids), dtype=bool)
    last[offsets[1:][lengths > 0] - 1] = True
    return RowEnds(np.maximum(raw - skip[doc], 0), raw < skip[doc], doc, last)


# --------------------------------------------------------------------------------------------------
# Pairing


@dataclass(frozen=True)
class Pairing:
    """The byte-offset pairing of a target shard's rows with a source shard's rows."""

    src_row: np.ndarray  # int64 [N_tgt]: the source row whose prefix ends at the same byte (-1: none)
    normalised: np.ndarray  # bool [N_tgt]: predicting rows beyond the bytes both tokenizations spell
    tgt: RowEnds
    src: RowEnds
    tgt_spelling: Spelling
    src_spelling: Spelling  # in the TARGET's document order
    order: np.ndarray  # target document d is source document order[d]

    @property
    def positions(self) -> np.ndarray:
        """bool [N_tgt]: rows that predict a token (all but each document's last)."""
        return ~self.tgt.last


def _ids(shard: Shard, name: str = "input_ids") -> np.ndarray:
    return np.asarray(shard[name]).astype(np.int64)


def pair_rows(
    src: Shard,
    tgt: Shard,
    src_view: TokenizerView,
    tgt_view: TokenizerView,
    doc_text: np.ndarray,
    doc_text_offsets: np.ndarray,
    doc_text_index: np.ndarray,
) -> Pairing:
    """Pair every target row with the source row whose prefix ends at the same byte of the same document."""
    order = _document_order(src, tgt)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))  # source document j is target document inverse[j]
    starts, stops = text_order(np.asarray(tgt["doc_index"]), doc_text, doc_text_offsets, doc_text_index)
    text = np.asarray(doc_text).tobytes()
    tgt_ids, src_ids = _ids(tgt), _ids(src)
    tgt_off, src_off = np.asarray(tgt["doc_offsets"]), np.asarray(src["doc_offsets"])
    for shard, off in ((tgt, tgt_off), (src, src_off)):
        if np.any(np.diff(off) == 0):
            d = int(np.asarray(shard["doc_index"])[np.flatnonzero(np.diff(off) == 0)[0]])
            raise AlignmentError(f"{shard.path}: document {d} has no tokens (every document ends with EOS)")
    t_spell = spelling(tgt_view, tgt_ids, tgt_off, text, starts, stops)
    s_spell = spelling(src_view, src_ids, src_off, text, starts[inverse], stops[inverse])
    t_rows = row_ends(tgt_view, tgt_ids, tgt_off, t_spell.skip)
    s_rows = row_ends(src_view, src_ids, src_off, s_spell.skip)
    agree = np.minimum(t_spell.agree, s_spell.agree[order])  # per target document
    # Keys: each target document owns the interval [base_d, base_d + len_d]; intervals are disjoint.
    base = np.zeros(len(order), dtype=np.int64)
    np.cumsum((stops - starts)[:-1] + 1, out=base[1:])
    s_doc = inverse[s_rows.doc]
    s_ok = ~s_rows.last & (s_rows.end <= agree[s_doc])
    t_ok = ~t_rows.last & (t_rows.end <= agree[t_rows.doc])
    src_row = match_ends(base[s_doc] + s_rows.end, s_ok, base[t_rows.doc] + t_rows.end, t_ok)
    return Pairing(src_row, ~t_rows.last & ~t_ok, t_rows, s_rows, t_spell, s_spell.take(order), order)


def match_ends(
    src_keys: np.ndarray, src_ok: np.ndarray, tgt_keys: np.ndarray, tgt_ok: np.ndarray
) -> np.ndarray:
    """int64 [len(tgt_keys)]: for each usable target row, the LAST usable source row with the same key
    (global byte offset), else -1. A sort and a binary search: O((n + m) log n), no Python per row."""
    cand = np.flatnonzero(src_ok)
    keys = src_keys[cand]
    by_key = np.argsort(keys, kind="stable")  # equal keys stay in row order: the last is the latest row
    keys, cand = keys[by_key], cand[by_key]
    out = np.full(len(tgt_keys), -1, dtype=np.int64)
    if not len(keys):
        return out
    hit = np.searchsorted(keys, tgt_keys, side="right") - 1
    safe = np.maximum(hit, 0)
    found = tgt_ok & (hit >= 0) & (keys[safe] == tgt_keys)
    out[found] = cand[safe[found]]
    return out


# --------------------------------------------------------------------------------------------------
# Diagnostics


@dataclass
class AlignDiagnostics:
    """How much of a source reached the target's positions, and what was lost where; for any method.

    Every predicting target row (positions) is either received or lost to exactly one cause:
      lost_at_boundary   a source prefix ends at the same byte, yet the row got nothing (exact: no entry
                         projected; mined/em: DTW did not pair it 1:1, or rejected or could not map the pair)
      lost_special       no source prefix ends there and the row's own token is special (a BOS row, whose
                         empty prefix the source has no row for)
      lost_no_boundary   no source prefix ends there (the tokenizations split the text differently)
      lost_normalised    the row's prefix is beyond the bytes both tokenizations spell identically
    boundary = rows where a source prefix ends at the same byte: the bound of any method that transfers
    only distributions conditioned on the same text. received_at_boundary counts the received rows whose
    source row really ends at the same byte (exact: all of them; DTW can pair tokens whose contexts differ).
    Masses are sums of probabilities: source_mass over the source's top-k at the rows the method paired
    (exact: boundary rows; mined/em: received rows), projected_mass what of it the aligned rows hold
    (exact sums duplicates; mined/em keep the best of duplicates, so part of their mass is dropped there),
    special_mass the part on source special tokens other than EOS (exact only)."""

    method: str
    documents: int = 0
    positions: int = 0
    received: int = 0
    boundary: int = 0
    received_at_boundary: int = 0
    lost_at_boundary: int = 0
    lost_special: int = 0
    lost_no_boundary: int = 0
    lost_normalised: int = 0
    normalised_documents: int = 0
    normalised_examples: list[dict[str, Any]] = field(default_factory=list)
    source_entries: int = 0
    entries: int = 0
    source_mass: float = 0.0
    projected_mass: float = 0.0
    special_mass: float = 0.0

    @property
    def received_fraction(self) -> float:
        return self.received / self.positions if self.positions else 0.0

    @property
    def boundary_fraction(self) -> float:
        return self.boundary / self.positions if self.positions else 0.0

    @property
    def mass_fraction(self) -> float:
        return self.projected_mass / self.source_mass if self.source_mass else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "received_fraction": self.received_fraction,
            "boundary_fraction": self.boundary_fraction,
            "mass_fraction": self.mass_fraction,
        }


def _probability_mass(logprobs: np.ndarray) -> float:
    lp = np.asarray(logprobs, dtype=np.float64)
    return float(np.exp(lp[np.isfinite(lp)]).sum())


def diagnose(
    pairing: Pairing,
    method: str,
    rows: np.ndarray,
    s_rows: np.ndarray,
    tgt_input: np.ndarray,
    tgt_view: TokenizerView,
    doc_index: np.ndarray,
) -> AlignDiagnostics:
    """Row counts of a method that gave target rows `rows` the source's rows `s_rows`."""
    positions = pairing.positions
    received = np.zeros(len(positions), dtype=bool)
    received[rows] = True
    at_boundary = pairing.src_row >= 0
    same_end = (pairing.tgt.end[rows] == pairing.src.end[s_rows]) & at_boundary[rows]
    special = np.zeros(tgt_view.vocab_size, dtype=bool)
    special[tgt_view.special_ids] = True
    lost = positions & ~received
    no_pair = lost & ~at_boundary & ~pairing.normalised
    diag = AlignDiagnostics(
        method=method,
        documents=len(pairing.order),
        positions=int(positions.sum()),
        received=int(received.sum()),
        boundary=int(at_boundary.sum()),
        received_at_boundary=int(same_end.sum()),
        lost_at_boundary=int((lost & at_boundary).sum()),
        lost_special=int((no_pair & special[tgt_input]).sum()),
        lost_no_boundary=int((no_pair & ~special[tgt_input]).sum()),
        lost_normalised=int((lost & pairing.normalised).sum()),
    )
    _name_normalised(diag, pairing, doc_index)
    return diag


def _name_normalised(diag: AlignDiagnostics, pairing: Pairing, doc_index: np.ndarray) -> None:
    bad = np.flatnonzero(~pairing.tgt_spelling.full | ~pairing.src_spelling.full)
    diag.normalised_documents = len(bad)
    for d in bad[:_EXAMPLES].tolist():
        sides = [
            side
            for side, sp in (("target", pairing.tgt_spelling), ("source", pairing.src_spelling))
            if not sp.full[d]
        ]
        agree = min(pairing.tgt_spelling.agree[d], pairing.src_spelling.agree[d])
        diag.normalised_examples.append({"doc_index": int(doc_index[d]), "byte": int(agree), "tokens": sides})


# --------------------------------------------------------------------------------------------------
# Shard transforms


def check_ids(src: Shard, tgt: Shard, src_view: TokenizerView, tgt_view: TokenizerView) -> None:
    for name, ids, view in (
        ("source", src["input_ids"], src_view),
        ("source top-k", src["topk_ids"], src_view),
        ("target", tgt["input_ids"], tgt_view),
    ):
        ids = np.asarray(ids)
        if ids.size and int(ids.max()) >= view.vocab_size:
            raise AlignmentError(
                f"{name} ids reach {int(ids.max())}, beyond {view.name}'s {view.vocab_size} tokens: the "
                "shard was extracted with another tokenizer"
            )


def _split_continuations(
    projected: np.ndarray,
    src_topk: np.ndarray,
    src_lp: np.ndarray,
    tgt: Shard,
    rows: np.ndarray,
    modes: np.ndarray,
    first_source: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    tgt_topk = _ids(tgt, "topk_ids")[rows]
    tgt_lp = np.asarray(tgt["topk_logprobs"])[rows]
    return split_by_target(projected, src_topk, src_lp, tgt_topk, tgt_lp, first_source, modes == 0)


def align_shard_exact(
    src: Shard,
    tgt: Shard,
    src_view: TokenizerView,
    tgt_view: TokenizerView,
    projection: Projection,
    doc_text: np.ndarray,
    doc_text_offsets: np.ndarray,
    doc_text_index: np.ndarray,
    first_source: np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray], AlignDiagnostics]:
    """The arrays of an aligned shard (fusion.format) by exact byte-offset pairing, and its diagnostics.

    doc_text / doc_text_offsets / doc_text_index: the prepared shard's `text`, `doc_offsets`, `doc_index`
    (documents joined on doc_index; it may hold more documents than the extract shards). first_source (the
    continuation projection, fusion.continuation): a source entry the target's own entries at the row
    continue is split among them."""
    projection.check(src_view, tgt_view)
    check_ids(src, tgt, src_view, tgt_view)
    missing = projection.missing(needed_source_ids(src))
    if missing.size:
        raise AlignmentError(
            f"projection lacks {missing.size} source ids of {src.path} (e.g. {missing[:5].tolist()}); "
            "build or extend it with src_ids=needed_source_ids(shard)"
        )
    pairing = pair_rows(src, tgt, src_view, tgt_view, doc_text, doc_text_offsets, doc_text_index)
    rows = np.flatnonzero(pairing.src_row >= 0)
    s_rows = pairing.src_row[rows]
    src_topk = _ids(src, "topk_ids")[s_rows]
    src_lp = np.asarray(src["topk_logprobs"])[s_rows]
    modes = mode_index(pairing.src.at_start[s_rows], pairing.tgt.at_start[rows])
    projected, projected_lp = projection.lookup(src_topk, modes), src_lp
    if first_source is not None:
        projected, projected_lp = _split_continuations(
            projected, src_topk, src_lp, tgt, rows, modes, first_source
        )
    ids, lp = sum_duplicates(projected, projected_lp)
    ids, lp = ids[:, : src_topk.shape[1]], lp[:, : src_topk.shape[1]]  # the source's k entries, best first
    kept = ids[:, 0] >= 0  # a row none of whose entries projected carries nothing: it falls back
    arrays = aligned_arrays(src, tgt, pairing.order, rows[kept], s_rows[kept], ids[kept], lp[kept])
    tgt_input = _ids(tgt)
    diag = diagnose(
        pairing, "exact", rows[kept], s_rows[kept], tgt_input, tgt_view, np.asarray(tgt["doc_index"])
    )
    live = (src_topk >= 0) & np.isfinite(src_lp.astype(np.float64))
    p = np.where(live, np.exp(src_lp.astype(np.float64)), 0.0)
    dropped_special = live & (projection.outcome[np.maximum(src_topk, 0)] == SPECIAL)
    diag.source_entries = int(live.sum())
    diag.entries = int((ids[kept] >= 0).sum())
    diag.source_mass = float(p.sum())
    diag.projected_mass = _probability_mass(lp[kept])
    diag.special_mass = float(p[dropped_special].sum())
    return arrays, diag


def align_shard_with_diagnostics(
    src: Shard,
    tgt: Shard,
    src_view: TokenizerView,
    tgt_view: TokenizerView,
    vocab_map: VocabMap,
    method: str,
    doc_text: np.ndarray,
    doc_text_offsets: np.ndarray,
    doc_text_index: np.ndarray,
) -> tuple[dict[str, np.ndarray], AlignStats, AlignDiagnostics]:
    """The paper's DTW alignment (mined / em, unchanged) with the same diagnostics as align_shard_exact,
    so that the methods compare side by side (the bound is the same byte-boundary bound)."""
    arrays, stats, rows, s_rows = align_shard_dtw(src, tgt, src_view, tgt_view, vocab_map, method)
    pairing = pair_rows(src, tgt, src_view, tgt_view, doc_text, doc_text_offsets, doc_text_index)
    diag = diagnose(pairing, method, rows, s_rows, _ids(tgt), tgt_view, np.asarray(tgt["doc_index"]))
    src_lp = np.asarray(src["topk_logprobs"])[s_rows]
    live = (_ids(src, "topk_ids")[s_rows] >= 0) & np.isfinite(src_lp.astype(np.float64))
    diag.source_entries = int(live.sum())
    diag.entries = int((arrays["topk_ids"][rows] >= 0).sum())
    diag.source_mass = _probability_mass(np.where(live, src_lp, -np.inf))
    diag.projected_mass = _probability_mass(arrays["topk_logprobs"][rows])
    return arrays, stats, diag
