"""Learning-rate schedule: linear warmup, then cosine / linear / constant decay to min_lr_ratio.

The schedule is ours and is handed to DeepSpeed as an object (the reference let a scheduler block in the
DeepSpeed config silently override the one asked for: FuseLLM defect 3). `lr_factor` is the pure rule;
`make_scheduler` wraps it in a torch LambdaLR whose state (last_epoch) DeepSpeed saves in checkpoints.

Step s (0-based) is the s-th optimizer update. Warmup lasts W = ceil(warmup_ratio * T) updates and ramps
(s + 1) / W, so the first update already moves (a factor of 0 would waste it). Decay then runs over the
remaining T - W updates with progress p = (s - W) / (T - W) in [0, 1): the first update after warmup uses
the full rate, as Hugging Face's schedules do.
"""

from __future__ import annotations

import math
from typing import Literal

ScheduleKind = Literal["cosine", "linear", "constant"]


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
    return min(total_steps, math.ceil(warmup_ratio * total_steps))


def lr_factor(
    step: int, total_steps: int, warmup_ratio: float, kind: ScheduleKind, min_lr_ratio: float = 0.0
) -> float:
    """Multiplier of the base learning rate for optimizer update `step` (0-based) of `total_steps`."""
    if kind not in ("cosine", "linear", "constant"):
        raise ValueError(f"unknown schedule {kind!r}; expected cosine, linear or constant")
    w = warmup_steps(total_steps, warmup_ratio)
    if step < w:
        return (step + 1) / w
    if kind == "constant":
        return 1.0
    decay = total_steps - w
    progress = min(1.0, (step - w) / decay) if decay > 0 else 1.0
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def lambda_at(step: int, total_steps: int, lam: float, lam_final: float | None) -> float:
    """The causal-LM weight of optimizer update `step` (0-based) of `total_steps`: `lam` throughout when
    `lam_final` is None, else linear from `lam` at the first update to `lam_final` at the last."""
    if lam_final is None or total_steps < 2:
        return lam
    return lam + (lam_final - lam) * min(step, total_steps - 1) / (total_steps - 1)


def make_scheduler(
    optimizer, total_steps: int, warmup_ratio: float, kind: ScheduleKind, min_lr_ratio: float = 0.0
):
    """A torch LambdaLR following `lr_factor`; DeepSpeed steps it once per optimizer update."""
    import functools

    from torch.optim.lr_scheduler import LambdaLR

    rule = functools.partial(
        _factor_of, total_steps=total_steps, warmup_ratio=warmup_ratio, kind=kind, min_lr_ratio=min_lr_ratio
    )
    return LambdaLR(optimizer, rule)


def _factor_of(
    step: int, *, total_steps: int, warmup_ratio: float, kind: ScheduleKind, min_lr_ratio: float
) -> float:
    return lr_factor(step, total_steps, warmup_ratio, kind, min_lr_ratio)
