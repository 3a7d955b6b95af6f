"""fuse --shard S: the target's and the aligned sources' distributions -> the fused training targets."""

from __future__ import annotations

from typing import Any

import numpy as np

from jobs.stages.common import StageContext, StageError, shard_key


def candidate_names(ctx: StageContext) -> list[str]:
    """Fusion candidates in spec order: the target (when fusion.includeTarget), then the sources."""
    srcs = [m.name for m in ctx.spec.sources]
    return ([ctx.spec.target.name] if ctx.spec.fusion.include_target else []) + srcs


def choice_counts(choice: np.ndarray, names: list[str]) -> dict[str, int]:
    """How often MinCE picked each candidate (documents or positions); empty for AvgCE (-1 everywhere)."""
    picked = np.asarray(choice, dtype=np.int64)
    picked = picked[picked >= 0]
    if picked.size == 0:
        return {}
    counts = np.bincount(picked, minlength=len(names))
    return {name: int(c) for name, c in zip(names, counts, strict=False)}


def run(ctx: StageContext) -> tuple[dict[str, Any], dict[str, Any]]:
    from fusion.format import write_shard
    from fusion.fuse import fuse_shard

    s = ctx.task.shard
    assert s is not None
    fz = ctx.spec.fusion
    tgt = ctx.spec.target.name
    target = ctx.input_shard(ctx.task_of(f"extract-{tgt}-{s:05d}"), shard_key(f"extract/{tgt}", s), "extract")
    aligned = [
        ctx.input_shard(ctx.task_of(f"align-{m.name}-{s:05d}"), shard_key(f"align/{m.name}", s), "aligned")
        for m in ctx.spec.sources
    ]
    try:
        arrays = fuse_shard(
            target, aligned, fz.strategy, fz.level, fz.ce_unit, fz.temperature, fz.include_target, fz.top_k
        )
    except ValueError as err:
        raise StageError(f"fusing shard {s}: {err}") from None
    key = shard_key("fuse", s)
    path = ctx.output_path(key)
    names = candidate_names(ctx)
    info = write_shard(
        path, "fused", arrays, meta={"candidates": names, "strategy": fz.strategy, "level": fz.level}
    )
    ctx.add_output(key, path, info.sha256)
    width = int(arrays["target_ids"].shape[1])
    filled = float((arrays["target_ids"] >= 0).sum(axis=1).mean()) if len(arrays["target_ids"]) else 0.0
    counts = {"documents": int(target.n_docs), "tokens": int(target.n_tokens), "bytes": info.nbytes}
    return counts, {
        "choice_counts": choice_counts(arrays["choice"], names),
        "candidates": names,
        "width": width,
        "mean_entries_per_row": round(filled, 3),
    }
