"""Status policy, training progress: status.training from the train jobs' progress.json, and the progress
column (tasks done / total, or the slowest running variant's training percent)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from jobs.progress import parse_progress as read_record
from jobs.status import TaskStatus, TrainingProgress

if TYPE_CHECKING:
    from jobs.plan import Task


def parse_progress(variant: str, raw: Mapping[str, Any]) -> TrainingProgress | None:
    """progress.json -> status entry, read as the train stage wrote it (jobs.progress: every version's
    keys); None when unusable."""
    rec = read_record(raw)
    return rec.to_status(variant) if rec is not None else None


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
