"""Status policy, training progress: the train jobs' progress.json files as status entries (status.training
and the progress column are jobs.derive's)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from jobs.progress import parse_progress as read_record
from jobs.status import TrainingProgress

if TYPE_CHECKING:
    from jobs.plan import Task


def parse_progress(variant: str, raw: Mapping[str, Any]) -> TrainingProgress | None:
    """progress.json -> status entry, read as the train stage wrote it (jobs.progress: every version's
    keys); None when unusable."""
    rec = read_record(raw)
    return rec.to_status(variant) if rec is not None else None


def progress_entries(
    train_tasks: Sequence[Task], raw: Mapping[str, Mapping[str, Any]]
) -> dict[str, TrainingProgress]:
    """Variant -> its progress read this pass (the usable ones)."""
    out = {}
    for t in train_tasks:
        if t.variant in raw and (p := parse_progress(t.variant, raw[t.variant])) is not None:
            out[t.variant] = p
    return out
