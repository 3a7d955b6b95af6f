"""Status policy, training progress: status.training from the train jobs' progress.json, and the progress
column (tasks done / total, or the slowest running variant's training percent)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from jobs.status import TaskStatus, TrainingProgress

if TYPE_CHECKING:
    from jobs.plan import Task


def parse_progress(variant: str, raw: Mapping[str, Any]) -> TrainingProgress | None:
    """progress.json (step, total_steps, loss, clm_loss, fusion_loss, tokens_per_s, lr, eta_seconds,
    updated_at) -> status entry; None when it is not usable."""
    try:
        step, total = int(raw.get("step", 0)), int(raw.get("total_steps", 0))

        def num(key: str) -> float | None:
            v = raw.get(key)
            return float(v) if isinstance(v, int | float) and math.isfinite(v) else None

        updated = raw.get("updated_at")
        return TrainingProgress(
            variant=variant,
            step=step,
            total_steps=total,
            percent=round(100.0 * step / total, 1) if total > 0 else 0.0,
            loss=num("loss"),
            clm_loss=num("clm_loss"),
            fusion_loss=num("fusion_loss"),
            tokens_per_second=num("tokens_per_s"),
            learning_rate=num("lr"),
            eta_seconds=num("eta_seconds"),
            updated_at=str(updated) if updated is not None else None,
        )
    except (TypeError, ValueError):
        return None


def training_entries(
    old: Sequence[TrainingProgress], train_tasks: Sequence[Task], raw: Mapping[str, Mapping[str, Any]]
) -> dict[str, TrainingProgress]:
    """Progress by variant: what the store has now, else the last one seen (kept after training)."""
    out = {p.variant: p for p in old}
    for t in train_tasks:
        if t.variant in raw:
            p = parse_progress(t.variant, raw[t.variant])
            if p is not None:
                out[t.variant] = p
    return out


def progress_column(
    phase: str,
    tasks: Sequence[TaskStatus],
    train_tasks: Sequence[Task],
    training: Mapping[str, TrainingProgress],
    records: Mapping[str, TaskStatus],
) -> str:
    running = [
        training[t.variant] for t in train_tasks if t.variant in training and records[t.id].state == "Running"
    ]
    if phase == "Running" and running:  # the slowest variant decides
        return f"train {min(p.percent for p in running):.0f}%"
    return f"{sum(r.state == 'Succeeded' for r in tasks)}/{len(tasks)}"
