"""Source-value diagnostics: can a source teach the target anything, and where is its signal lost?

Inputs: the target's extract shard, one aligned shard per source (same documents, on the target's
positions), and optionally each source's own extract shard (for its top-k mass). Everything is measured on
the target's predicting positions (every row but each document's last); row t's gold is the target's
input_ids[t+1], its bytes the target's token_nbytes[t+1] (0 for special tokens, as evaluate counts them).

Distributions "as fusion uses them" (fusion.fuse): q = softmax(top-k log-probs / T) over a row's non-empty
entries (its `top_k` most likely when set). A candidate's CE on the gold token is -log2 q(gold) bits. A gold
token outside the entries has q(gold) = 0 and an infinite CE: the fusion term then pulls mass AWAY from the
right token. Such a miss is charged -log2(floor) bits (floor 1e-4: 13.3 bits); the miss rates are reported
beside every CE, so that no conclusion hangs on the floor's value.

A source's distribution exists only at its aligned rows (aligned == 1). Elsewhere its aligned shard holds a
one-hot on the gold token: the CLM label again, nothing learnt from the source. Source-vs-target figures
are therefore taken on that source's aligned rows only, both candidates on the same rows; coverage says
what share of the positions that is.

Per source:
- fused view on its aligned rows: bits/byte of the target's q and of the source's q; miss rates; the share
  of rows where the source puts more mass on the gold token than the target (and the reverse); the
  per-token oracle (the better of the two per row) and the per-document oracle (the better per document);
- the same two on the rows where both hold the gold among their entries (no floor involved);
- MinCE (sequence level, this source against the target, on fusion.fuse's own CE) per document, its
  bits/byte on those rows and how often it agrees with the per-document oracle; and token-level MinCE
  (fusion.fuse's per-position rule, which decides by the full-softmax log p of each side's gold token:
  close to an oracle at the gold token by construction, so its fused-view figure is optimistic);
- full softmax (before truncation and projection) on the same rows: the target's log p(gold) and the
  source's log p of its own gold token at the paired position (the same text where the pair is exact);
- where mass is lost: coverage (rows with no source distribution), top-k truncation (1 - the top-k mass at
  the source's own positions, from its extract shard), projection (the full-softmax mass that survives
  mapping into the target vocabulary at aligned rows: dropped entries and merged duplicates, which keep
  only the highest; and the share of the k entries kept).
Overall: the target alone and the per-token oracle over all candidates on all positions (the headroom any
choice of candidate could reach).

Figures are sums (bits, bytes, counts) so that shards combine by adding (`merge`). Pure numpy, vectorised
over positions; the [N, k] arrays are read in blocks of rows from the memory-mapped shards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from fusion.format import Shard
from fusion.fuse import (
    Candidate,
    FusionError,
    aligned_candidate,
    gold_ids,
    gold_probability,
    sequence_ce,
    target_candidate,
    token_ce,
)

_BLOCK_ROWS = 1 << 16
LN2 = math.log(2)


@dataclass
class SourceFigures:
    """One source against the target. Sums over rows unless named otherwise; rates are properties."""

    name: str
    positions: int = 0  # target rows that predict a token
    aligned: int = 0  # of those, rows carrying the source's distribution
    aligned_bytes: int = 0  # gold bytes at those rows
    target_bits: float = 0.0  # fused view, aligned rows (misses at the floor)
    source_bits: float = 0.0
    token_oracle_bits: float = 0.0  # the better of the two per row
    target_misses: int = 0  # gold outside the candidate's entries
    source_misses: int = 0
    source_more: int = 0  # rows where q_source(gold) > q_target(gold)
    target_more: int = 0
    both_hit: int = 0  # rows where both candidates hold the gold among their entries (no floor involved)
    both_hit_bytes: int = 0
    both_hit_target_bits: float = 0.0
    both_hit_source_bits: float = 0.0
    token_mince_bits: float = 0.0  # MinCE per position by fusion.fuse's own per-token CE, in the fused view
    token_mince_source: int = 0  # rows where it picks the source
    target_full_bits: float = 0.0  # full softmax, aligned rows
    source_full_bits: float = 0.0
    source_full_more: int = 0
    kept_mass: float = 0.0  # sum over aligned rows of the full-softmax mass of the entries fusion keeps
    kept_entries: int = 0  # non-empty entries at aligned rows
    width: int = 0  # entries a row can hold (k)
    own_rows: int = 0  # the source's own predicting rows (from its extract shard, when given)
    own_topk_mass: float = 0.0  # sum over them of its top-k mass
    # Per document (aligned rows only), for the document-level oracle and MinCE.
    doc_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    doc_bytes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    doc_target_bits: np.ndarray = field(default_factory=lambda: np.zeros(0))
    doc_source_bits: np.ndarray = field(default_factory=lambda: np.zeros(0))
    doc_mince_source: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # MinCE picks it

    # -- rates ---------------------------------------------------------------------------------------
    @property
    def coverage(self) -> float:
        return _ratio(self.aligned, self.positions)

    def bpb(self, bits: float) -> float:
        return _ratio(bits, self.aligned_bytes)

    @property
    def docs(self) -> np.ndarray:
        """Documents with aligned bytes (the others have nothing to compare)."""
        return self.doc_bytes > 0

    @property
    def doc_source_better(self) -> np.ndarray:
        return self.docs & (self.doc_source_bits < self.doc_target_bits)

    @property
    def doc_oracle_bits(self) -> float:
        return float(np.minimum(self.doc_source_bits, self.doc_target_bits)[self.docs].sum())

    @property
    def mince_bits(self) -> float:
        picked = np.where(self.doc_mince_source, self.doc_source_bits, self.doc_target_bits)
        return float(picked[self.docs].sum())

    @property
    def mince_agreement(self) -> float:
        """Share of documents where MinCE picks what the per-document oracle picks."""
        return _ratio(
            int((self.doc_mince_source == self.doc_source_better)[self.docs].sum()), self.docs.sum()
        )

    def summary(self) -> dict[str, Any]:
        n, d = self.aligned, int(self.docs.sum())
        better = self.doc_source_better
        return {
            "source": self.name,
            "positions": self.positions,
            "coverage": round(self.coverage, 4),
            "fused_view_bpb": {
                "target": round(self.bpb(self.target_bits), 4),
                "source": round(self.bpb(self.source_bits), 4),
                "token_oracle": round(self.bpb(self.token_oracle_bits), 4),
                "document_oracle": round(self.bpb(self.doc_oracle_bits), 4),
                "mince": round(self.bpb(self.mince_bits), 4),
            },
            "both_hit": {
                "rows": round(_ratio(self.both_hit, n), 4),
                "target_bpb": round(_ratio(self.both_hit_target_bits, self.both_hit_bytes), 4),
                "source_bpb": round(_ratio(self.both_hit_source_bits, self.both_hit_bytes), 4),
            },
            "token_mince": {
                "bpb": round(self.bpb(self.token_mince_bits), 4),
                "rows_source": round(_ratio(self.token_mince_source, n), 4),
            },
            "miss_rate": {
                "target": round(_ratio(self.target_misses, n), 4),
                "source": round(_ratio(self.source_misses, n), 4),
            },
            "rows_source_more_mass": round(_ratio(self.source_more, n), 4),
            "rows_target_more_mass": round(_ratio(self.target_more, n), 4),
            "full_softmax_bpb": {
                "target": round(self.bpb(self.target_full_bits), 4),
                "source": round(self.bpb(self.source_full_bits), 4),
            },
            "rows_source_more_full": round(_ratio(self.source_full_more, n), 4),
            "documents": d,
            "documents_source_better": int(better.sum()),
            "bytes_source_better": round(
                _ratio(int(self.doc_bytes[better].sum()), int(self.doc_bytes.sum())), 4
            ),
            "documents_mince_source": int((self.doc_mince_source & self.docs).sum()),
            "mince_agreement": round(self.mince_agreement, 4),
            "mass": {
                "source_topk_own": round(_ratio(self.own_topk_mass, self.own_rows), 4)
                if self.own_rows
                else None,
                "kept_after_projection": round(_ratio(self.kept_mass, n), 4),
                "entries_kept": round(_ratio(self.kept_entries, n * self.width), 4),
            },
        }


@dataclass
class Diagnostics:
    """Every source's figures and the overall ones (all positions, all candidates)."""

    sources: list[SourceFigures]
    positions: int = 0
    nbytes: int = 0
    target_bits: float = 0.0  # fused view of the target, all predicting rows
    oracle_bits: float = 0.0  # best candidate per row (a source only where aligned)
    target_full_bits: float = 0.0
    target_misses: int = 0
    target_topk_mass: float = 0.0
    mince_counts: dict[str, int] = field(default_factory=dict)  # MinCE over all candidates, documents

    def summary(self) -> dict[str, Any]:
        return {
            "positions": self.positions,
            "bytes": self.nbytes,
            "target_fused_view_bpb": round(_ratio(self.target_bits, self.nbytes), 4),
            "target_full_softmax_bpb": round(_ratio(self.target_full_bits, self.nbytes), 4),
            "oracle_all_candidates_bpb": round(_ratio(self.oracle_bits, self.nbytes), 4),
            "target_miss_rate": round(_ratio(self.target_misses, self.positions), 4),
            "target_topk_mass": round(_ratio(self.target_topk_mass, self.positions), 4),
            "mince_documents": dict(self.mince_counts),
            "sources": [s.summary() for s in self.sources],
            "verdict": verdict(self),
        }


def to_record(d: Diagnostics) -> dict[str, Any]:
    """A JSON-able form of one shard's diagnostics (sums and per-document arrays): what the fuse stage
    stores beside its shard, so that a report merges shards (`merge`) without reading them again."""

    def plain(obj: Any) -> dict[str, Any]:
        return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj) if f.name != "sources"}

    return {**plain(d), "sources": [plain(s) for s in d.sources]}


def from_record(record: dict[str, Any]) -> Diagnostics:
    """The inverse of to_record."""
    arrays = {f.name: f.default_factory().dtype for f in fields(SourceFigures) if f.name.startswith("doc_")}
    sources = [
        SourceFigures(**{k: np.asarray(v, dtype=arrays[k]) if k in arrays else v for k, v in s.items()})
        for s in record["sources"]
    ]
    return Diagnostics(sources=sources, **{k: v for k, v in record.items() if k != "sources"})


def _plain(v: Any) -> Any:
    return v.tolist() if isinstance(v, np.ndarray) else v


def _ratio(a: float, b: float) -> float:
    return float(a) / float(b) if b else float("nan")


def _bits(q: np.ndarray, floor: float) -> np.ndarray:
    return -np.log2(np.maximum(q, floor))


def _per_doc(doc_of_row: np.ndarray, rows: np.ndarray, values: np.ndarray, n_docs: int) -> np.ndarray:
    return np.bincount(doc_of_row[rows], weights=values[rows], minlength=n_docs)


def source_figures(
    name: str,
    tgt: Candidate,
    src: Candidate,
    ctx: dict[str, np.ndarray],
    q_target: np.ndarray,
    q_source: np.ndarray,
    kept: np.ndarray,
    floor: float,
    ce_unit: str,
) -> SourceFigures:
    """One source's figures on its aligned rows (ctx: gold bytes, predicting rows, row -> document)."""
    rows = ctx["predicts"] & src.eligible
    nbytes, doc = ctx["nbytes"], ctx["doc_of_row"]
    bt, bs = _bits(q_target, floor), _bits(q_source, floor)
    full_t = -tgt.gold_logprob.astype(np.float64) / LN2
    full_s = -np.nan_to_num(src.gold_logprob.astype(np.float64), nan=0.0) / LN2
    n_docs = len(src.doc_nll)
    mince_source = sequence_ce(src, ce_unit) < sequence_ce(tgt, ce_unit)  # ties go to the target
    token_pick = token_ce(src, ce_unit) < token_ce(tgt, ce_unit)  # fusion.fuse's token-level rule
    both = rows & (q_target > 0) & (q_source > 0)
    return SourceFigures(
        name=name,
        positions=int(ctx["predicts"].sum()),
        aligned=int(rows.sum()),
        aligned_bytes=int(nbytes[rows].sum()),
        target_bits=float(bt[rows].sum()),
        source_bits=float(bs[rows].sum()),
        token_oracle_bits=float(np.minimum(bt, bs)[rows].sum()),
        target_misses=int((q_target[rows] == 0).sum()),
        source_misses=int((q_source[rows] == 0).sum()),
        source_more=int((q_source > q_target)[rows].sum()),
        target_more=int((q_target > q_source)[rows].sum()),
        both_hit=int(both.sum()),
        both_hit_bytes=int(nbytes[both].sum()),
        both_hit_target_bits=float(bt[both].sum()),
        both_hit_source_bits=float(bs[both].sum()),
        token_mince_bits=float(np.where(token_pick, bs, bt)[rows].sum()),
        token_mince_source=int((token_pick & rows).sum()),
        target_full_bits=float(full_t[rows].sum()),
        source_full_bits=float(full_s[rows].sum()),
        source_full_more=int((full_s < full_t)[rows].sum()),
        kept_mass=float(kept[rows].sum()),
        kept_entries=int(_kept_entries(src, rows)),
        width=src.width,
        doc_index=np.asarray(src.shard["doc_index"]).astype(np.int64),
        doc_bytes=np.bincount(doc[rows], weights=nbytes[rows], minlength=n_docs).astype(np.int64),
        doc_target_bits=_per_doc(doc, rows, bt, n_docs),
        doc_source_bits=_per_doc(doc, rows, bs, n_docs),
        doc_mince_source=mince_source,
    )


def _kept_entries(c: Candidate, rows: np.ndarray) -> int:
    total, n = 0, len(rows)
    for start in range(0, n, _BLOCK_ROWS):
        stop = min(n, start + _BLOCK_ROWS)
        ids, _ = c.block(start, stop)
        total += int((ids[rows[start:stop]] >= 0).sum())
    return total


def own_topk_mass(extract: Shard) -> tuple[int, float]:
    """(predicting rows, summed top-k mass) of a model's own extract shard: 1 - mean is what top-k
    truncation drops before anything is aligned."""
    _, _, predicts = gold_ids(extract)
    n, total = len(predicts), 0.0
    for start in range(0, n, _BLOCK_ROWS):
        lp = np.asarray(extract.rows("topk_logprobs", start, min(n, start + _BLOCK_ROWS))).astype(np.float64)
        total += float(np.exp(lp).sum(axis=1)[predicts[start : start + _BLOCK_ROWS]].sum())
    return int(predicts.sum()), total


def diagnose(
    target: Shard,
    aligned: dict[str, Shard],
    source_extracts: dict[str, Shard] | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    floor: float = 1e-4,
    ce_unit: str = "byte",
) -> Diagnostics:
    """The diagnostics of one shard: the target's extract shard, each source's aligned shard by name, and
    (optional) each source's own extract shard by name."""
    if not 0.0 < floor < 1.0:
        raise FusionError(f"diagnostics floor must be in (0, 1), got {floor}")
    if not temperature > 0:
        raise FusionError(f"diagnostics temperature must be positive, got {temperature}")
    for name, s in aligned.items():
        if not (
            np.array_equal(s["doc_index"], target["doc_index"])
            and np.array_equal(s["doc_offsets"], target["doc_offsets"])
        ):
            raise FusionError(
                f"{s.path} (source {name}): documents or positions differ from the target's {target.path}; "
                "diagnose the aligned shard of the same shard number, or rerun align"
            )
    tgt = target_candidate(target)
    tgt.top_k = top_k
    gold, nbytes, predicts = gold_ids(target)
    offsets = np.asarray(target["doc_offsets"])
    doc_of_row = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    ctx = {"nbytes": nbytes, "predicts": predicts, "doc_of_row": doc_of_row}
    q_t, kept_t = gold_probability(tgt, gold, temperature)
    bits_t = _bits(q_t, floor)
    oracle = bits_t.copy()
    figures, seq_ce = [], [sequence_ce(tgt, ce_unit)]
    for name, shard in aligned.items():
        src = aligned_candidate(shard)
        src.top_k = top_k
        q_s, kept_s = gold_probability(src, gold, temperature)
        fig = source_figures(name, tgt, src, ctx, q_t, q_s, kept_s, floor, ce_unit)
        if source_extracts and name in source_extracts:
            fig.own_rows, fig.own_topk_mass = own_topk_mass(source_extracts[name])
        figures.append(fig)
        oracle = np.where(src.eligible, np.minimum(oracle, _bits(q_s, floor)), oracle)
        seq_ce.append(sequence_ce(src, ce_unit))
    picks = np.bincount(np.argmin(np.stack(seq_ce), axis=0), minlength=len(seq_ce))
    return Diagnostics(
        sources=figures,
        positions=int(predicts.sum()),
        nbytes=int(nbytes[predicts].sum()),
        target_bits=float(bits_t[predicts].sum()),
        oracle_bits=float(oracle[predicts].sum()),
        target_full_bits=float((-tgt.gold_logprob.astype(np.float64) / LN2)[predicts].sum()),
        target_misses=int((q_t[predicts] == 0).sum()),
        target_topk_mass=float(kept_t[predicts].sum()),
        mince_counts=dict(zip(["target", *aligned], (int(x) for x in picks), strict=True)),
    )


def merge(parts: list[Diagnostics]) -> Diagnostics:
    """Diagnostics of several shards as one (sums added, per-document arrays concatenated)."""
    if not parts:
        raise ValueError("merge: no diagnostics to combine")
    names = [s.name for s in parts[0].sources]
    if any([s.name for s in p.sources] != names for p in parts):
        raise ValueError("merge: the shards' diagnostics cover different sources")
    sources = []
    for i, name in enumerate(names):
        merged = SourceFigures(name=name, width=parts[0].sources[i].width)
        for f in fields(SourceFigures):
            if f.name in ("name", "width"):
                continue
            values = [getattr(p.sources[i], f.name) for p in parts]
            setattr(merged, f.name, np.concatenate(values) if f.name.startswith("doc_") else sum(values))
        sources.append(merged)
    counts: dict[str, int] = {}
    for p in parts:
        for k, v in p.mince_counts.items():
            counts[k] = counts.get(k, 0) + v
    out = Diagnostics(sources=sources, mince_counts=counts)
    for f in fields(Diagnostics):
        if f.name not in ("sources", "mince_counts"):
            setattr(out, f.name, sum(getattr(p, f.name) for p in parts))
    return out


def verdict(d: Diagnostics) -> str:
    """One line: can fusion transfer anything from these sources, and where?"""
    helpful = [s for s in d.sources if s.doc_source_better.any()]
    if not helpful:
        return (
            "no source is better than the target on any document (fused view, aligned positions): "
            "fusion cannot help (nothing to transfer; any gain would be regularisation)"
        )
    lines = []
    for s in helpful:
        n_better, n_docs = int(s.doc_source_better.sum()), int(s.docs.sum())
        overall = "better" if s.source_bits < s.target_bits else "worse"
        lines.append(
            f"{s.name} is {overall} than the target overall on its aligned rows "
            f"({s.bpb(s.source_bits):.3f} vs {s.bpb(s.target_bits):.3f} bits/byte, "
            f"coverage {s.coverage:.0%}) "
            f"and better on {n_better} of {n_docs} documents; the per-document oracle would reach "
            f"{s.bpb(s.doc_oracle_bits):.3f}, MinCE reaches {s.bpb(s.mince_bits):.3f}"
        )
    return "; ".join(lines)
