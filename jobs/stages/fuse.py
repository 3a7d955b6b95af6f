"""fuse --shard S: the target's and the aligned sources' distributions -> the fused training targets."""

from __future__ import annotations

from typing import Any

import numpy as np

from fusion.diagnostics import diagnose, to_record, verdict
from fusion.fuse import GOLD_FLOOR, fuse_shard
from jobs.registry import Layout, Stage, Variant
from jobs.stages.common import StageContext, StageError


def candidate_names(ctx: StageContext) -> list[str]:
    """Fusion candidates in spec order: the target (when it is a teacher of this fuse variant), then the
    sources (unless self-distillation: the target's own distribution alone)."""
    srcs = [] if ctx.task.variant == Variant.self.value else [m.name for m in ctx.spec.sources]
    return ([ctx.spec.target.name] if includes_target(ctx) else []) + srcs


def includes_target(ctx: StageContext) -> bool:
    """fused: as fusion.includeTarget says; self: always (the only teacher); sources: never."""
    variant = ctx.task.variant or Variant.fused.value
    return {Variant.self.value: True, Variant.sources.value: False}.get(
        variant, ctx.spec.fusion.include_target
    )


def choice_counts(choice: np.ndarray, names: list[str]) -> dict[str, int]:
    """How often MinCE picked each candidate (documents or positions); empty for AvgCE (-1 everywhere)."""
    picked = np.asarray(choice, dtype=np.int64)
    picked = picked[picked >= 0]
    if picked.size == 0:
        return {}
    counts = np.bincount(picked, minlength=len(names))
    return {name: int(c) for name, c in zip(names, counts, strict=False)}


def record_source_value(ctx: StageContext, target: Any, aligned: list[Any]) -> str | None:
    """FuseLLM's fuse tasks keep the source-value diagnostics of their shard (what each source could teach
    the target before any training; fusion.diagnostics) beside it: the report merges them. Returns the
    shard's one-line verdict."""
    if (ctx.task.variant or Variant.fused.value) != Variant.fused.value or not aligned:
        return None
    fz = ctx.spec.fusion
    names = [dep.model for dep in ctx.dependencies(Stage.align)]
    d = diagnose(
        target, dict(zip(names, aligned, strict=True)), None, fz.temperature, fz.top_k, GOLD_FLOOR, fz.ce_unit
    )
    ctx.put_json(Layout.source_value(ctx.task), to_record(d))
    return verdict(d)


def run(ctx: StageContext) -> tuple[dict[str, Any], dict[str, Any]]:
    s = ctx.task.shard
    fz = ctx.spec.fusion
    target = ctx.input_shard(Stage.extract, model=ctx.spec.target.name)
    aligned = [ctx.input_shard(Stage.align, model=dep.model) for dep in ctx.dependencies(Stage.align)]
    with_target = includes_target(ctx)
    try:
        arrays = fuse_shard(
            target,
            aligned,
            fz.strategy,
            fz.level,
            fz.ce_unit,
            fz.temperature,
            with_target,
            fz.top_k,
            ce_on=fz.ce_on,
            fallback=fz.fallback,
        )
    except ValueError as err:
        raise StageError(f"fusing shard {s}: {err}") from None
    names = candidate_names(ctx)
    info = ctx.write_shard(arrays, meta={"candidates": names, "strategy": fz.strategy, "level": fz.level})
    verdict = record_source_value(ctx, target, aligned)
    width = int(arrays["target_ids"].shape[1])
    filled = float((arrays["target_ids"] >= 0).sum(axis=1).mean()) if len(arrays["target_ids"]) else 0.0
    counts = {"documents": int(target.n_docs), "tokens": int(target.n_tokens), "bytes": info.nbytes}
    return counts, {
        **({"source_value": verdict} if verdict else {}),
        "choice_counts": choice_counts(arrays["choice"], names),
        "candidates": names,
        "width": width,
        "mean_entries_per_row": round(filled, 3),
    }
