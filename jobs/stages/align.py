"""align --model SRC --shard S: map one source's predictions onto the target's tokens and vocabulary.

alignment.method exact (fusion.exact): target and source rows pair where their preceding text is the same
bytes; each source entry is projected onto the target token that spells its text first (fusion.project).
mined / em (fusion.align): the paper's DTW with a minimum-edit-distance / exact vocabulary map.

The projection and the vocabulary map are lazy by default: they cover only the source ids that occur in the
shards aligned so far, are cached in the store (Layout.projection / Layout.vocab_map), and are reused and
extended by later shards. They are caches, not outputs: a missing or stale one is rebuilt. Every method
records the same diagnostics (fusion.exact.AlignDiagnostics: coverage, the byte-boundary bound, the share
of the source's probability mass that reached the target vocabulary, positions lost by cause) in the
task's manifest summary.
"""

from __future__ import annotations

import hashlib
from typing import Any

from fusion.align import needed_source_ids
from fusion.continuation import first_source_tokens
from fusion.exact import align_shard_exact, align_shard_with_diagnostics
from fusion.project import Projection, ProjectionError, ensure_projection
from fusion.vocab import StaleVocabMapError, VocabMap, build_vocab_map, extend_vocab_map
from jobs.registry import Layout, Stage
from jobs.stages.common import StageContext, StageError, load_model_tokenizer, log_event


def load_or_build_map(ctx: StageContext, src_view: Any, tgt_view: Any, needed: Any) -> tuple[Any, str]:
    """The source's vocabulary map covering `needed` source ids, from the store's cache when it fits."""
    method = ctx.spec.alignment.method
    key = Layout.vocab_map(ctx.task.model or "")
    vmap = None
    if ctx.store.exists(key):
        path = ctx.store.download(key, ctx.scratch / "vocab-map.npz")
        try:
            vmap = VocabMap.load(path, src_view, tgt_view)
            if vmap.method != method:
                vmap = None
        except StaleVocabMapError as err:
            log_event("vocab-map-rebuild", task=ctx.task.id, reason=str(err))
            vmap = None
    full = ctx.spec.alignment.vocab_map == "full"
    if vmap is None:
        vmap, how = build_vocab_map(src_view, tgt_view, method, src_ids=None if full else needed), "built"
    elif vmap.missing(needed).size:
        vmap, how = extend_vocab_map(vmap, src_view, tgt_view, needed), "extended"
    else:
        return vmap, "reused"
    out = ctx.scratch / "vocab-map.new.npz"
    vmap.save(out)
    ctx.store.upload(out, key)
    return vmap, how


def load_or_build_projection(ctx: StageContext, src_tok: Any, tgt_tok: Any, needed: Any) -> tuple[Any, str]:
    """The source's projection onto the target vocabulary (exact alignment) covering `needed` source ids,
    from the store's cache when it was built for these tokenizers (fusion.project.ensure_projection)."""
    key = Layout.projection(ctx.task.model or "")
    cached = None
    if ctx.store.exists(key):
        try:
            cached = Projection.load(ctx.store.download(key, ctx.scratch / "projection.npz"))
        except (ProjectionError, OSError, ValueError) as err:
            log_event("projection-rebuild", task=ctx.task.id, reason=str(err))
    proj, how = ensure_projection(cached, src_tok, tgt_tok, needed)
    if how != "reused":
        out = ctx.scratch / "projection.new.npz"
        proj.save(out)
        ctx.store.upload(out, key)
    return proj, how


def run(ctx: StageContext) -> tuple[dict[str, Any], dict[str, Any]]:
    src, s = ctx.task.model, ctx.task.shard
    assert src is not None
    tgt, method = ctx.spec.target.name, ctx.spec.alignment.method
    src_shard = ctx.input_shard(Stage.extract, model=src)
    tgt_shard = ctx.input_shard(Stage.extract, model=tgt)
    docs = ctx.documents()  # the text both tokenized: exact pairing, and every method's diagnostics
    src_tok, src_view = load_model_tokenizer(ctx, src)
    tgt_tok, tgt_view = load_model_tokenizer(ctx, tgt)
    text = (docs["text"], docs["doc_offsets"], docs["doc_index"])
    needed = needed_source_ids(src_shard)
    try:
        if method == "exact":
            proj, how = load_or_build_projection(ctx, src_tok, tgt_tok, needed)
            first_source = None
            if ctx.spec.alignment.projection == "continuation":
                first_source = first_source_tokens(src_tok, tgt_tok, needed_source_ids(tgt_shard))
            arrays, diag = align_shard_exact(
                src_shard, tgt_shard, src_view, tgt_view, proj, *text, first_source=first_source
            )
            digest = hashlib.sha256(proj.ids.tobytes() + proj.outcome.tobytes()).hexdigest()
            summary: dict[str, Any] = {"projection": how, "projection_sha256": digest}
        else:
            vmap, how = load_or_build_map(ctx, src_view, tgt_view, needed)
            arrays, stats, diag = align_shard_with_diagnostics(
                src_shard, tgt_shard, src_view, tgt_view, vmap, method, *text
            )
            summary = {
                "vocab_map": how,
                "vocab_map_entries": int((vmap.ids >= 0).sum()),
                "vocab_map_sha256": hashlib.sha256(vmap.ids.tobytes()).hexdigest(),
                **stats.to_dict(),
            }
    except ValueError as err:
        raise StageError(f"aligning {src} onto {tgt}, shard {s}: {err}") from None
    info = ctx.write_shard(arrays, meta={"source": src, "target": tgt, "method": method})
    summary["diagnostics"] = diag.to_dict()
    counts = {"documents": int(tgt_shard.n_docs), "tokens": int(tgt_shard.n_tokens), "bytes": info.nbytes}
    return counts, summary
