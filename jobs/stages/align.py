"""align --model SRC --shard S: map one source's predictions onto the target's tokens and vocabulary.

The vocabulary map is lazy by default: it covers only the source ids that occur in the shards aligned so
far, and is cached in the store at align/<SRC>/vocab-map.npz, reused and extended by later shards. The map
is a cache, not an output: a missing or stale one (other tokenizers, other method) is rebuilt.
"""

from __future__ import annotations

import hashlib
from typing import Any

from jobs.registry import Layout, Stage
from jobs.stages.common import StageContext, StageError, load_model_tokenizer, log_event


def load_or_build_map(ctx: StageContext, src_view: Any, tgt_view: Any, needed: Any) -> tuple[Any, str]:
    """The source's vocabulary map covering `needed` source ids, from the store's cache when it fits."""
    from fusion.vocab import StaleVocabMapError, VocabMap, build_vocab_map, extend_vocab_map

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


def run(ctx: StageContext) -> tuple[dict[str, Any], dict[str, Any]]:
    from fusion.align import align_shard_with_stats, needed_source_ids

    src, s = ctx.task.model, ctx.task.shard
    assert src is not None
    tgt = ctx.spec.target.name
    src_shard = ctx.input_shard(Stage.extract, model=src)
    tgt_shard = ctx.input_shard(Stage.extract, model=tgt)
    _, src_view = load_model_tokenizer(ctx, src)
    _, tgt_view = load_model_tokenizer(ctx, tgt)
    vmap, how = load_or_build_map(ctx, src_view, tgt_view, needed_source_ids(src_shard))
    try:
        arrays, stats = align_shard_with_stats(
            src_shard, tgt_shard, src_view, tgt_view, vmap, ctx.spec.alignment.method
        )
    except ValueError as err:
        raise StageError(f"aligning {src} onto {tgt}, shard {s}: {err}") from None
    info = ctx.write_shard(arrays, meta={"source": src, "target": tgt, "method": ctx.spec.alignment.method})
    mapped = int((vmap.ids >= 0).sum())
    summary = {
        "vocab_map": how,
        "vocab_map_entries": mapped,
        "vocab_map_sha256": hashlib.sha256(vmap.ids.tobytes()).hexdigest(),
        **stats.to_dict(),
    }
    counts = {"documents": int(tgt_shard.n_docs), "tokens": int(tgt_shard.n_tokens), "bytes": info.nbytes}
    return counts, summary
