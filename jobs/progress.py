"""Training progress and history as the train job writes them to the store, typed once for every reader.

  Layout.progress(variant)        ProgressRecord: the latest step (rewritten every few seconds). The train
                                  job writes it; the operator turns it into status.training; the report and
                                  people read it.
  Layout.history(variant)         TrainingHistory: every logged step and every attempt's start, one JSON
                                  object per line. Rewritten whole (an atomic put) at each checkpoint, before
                                  the checkpoint's marker, and at the end; a resumed attempt first drops the
                                  steps after its checkpoint, so a step appears once whatever the restarts.

Imports neither torch nor fusion: the operator imports this module. Fields are named once, here;
progress.json files written before this record existed (tokens_per_s, lr) are still read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from jobs.registry import Layout
from jobs.status import TrainingProgress

ProgressState = Literal["running", "preempted", "finished"]
_STATES = ("running", "preempted", "finished")

# progress.json keys before ProgressRecord -> its field. Read; and still written beside the new keys until
# the operator reads through parse_progress (an operator of the previous release reads only these).
LEGACY_PROGRESS_KEYS: dict[str, str] = {"tokens_per_s": "tokens_per_second", "lr": "learning_rate"}


# Store keys of the train stage's records: the registry's Layout (progress, history).
progress_key = Layout.progress
history_key = Layout.history


# --------------------------------------------------------------------------------------------------
# progress.json


def _number(v: Any) -> float | None:
    """A finite number as float, else None (NaN and infinities are not figures a status can show)."""
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None


@dataclass(frozen=True)
class ProgressRecord:
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    clm_loss: float | None = None
    fusion_loss: float | None = None  # None for the CLM-only variant
    tokens_per_second: float | None = None
    learning_rate: float | None = None
    eta_seconds: float | None = None
    updated_at: str | None = None  # RFC 3339, UTC
    state: ProgressState | None = None  # None in files written before the field existed

    @property
    def percent(self) -> float:
        return round(100.0 * self.step / self.total_steps, 1) if self.total_steps > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.update({old: doc[new] for old, new in LEGACY_PROGRESS_KEYS.items()})
        return doc

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True).encode()

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ProgressRecord:
        """Lenient: unknown keys ignored, non-numbers and non-finite numbers read as None, the old key where
        the new one is absent. Raises ValueError when step or total_steps is not an integer."""
        values = {new: doc[old] for old, new in LEGACY_PROGRESS_KEYS.items() if old in doc}
        values.update({k: v for k, v in doc.items() if k in _FIELD_NAMES})
        try:
            step, total = int(values.get("step", 0)), int(values.get("total_steps", 0))
        except (TypeError, ValueError):
            raise ValueError(
                f"progress: step {values.get('step')!r} / total_steps {values.get('total_steps')!r} "
                "are not integers"
            ) from None
        updated, state = values.get("updated_at"), values.get("state")
        return cls(
            step=step,
            total_steps=total,
            **{name: _number(values.get(name)) for name in _FLOAT_FIELDS},
            updated_at=str(updated) if updated is not None else None,
            state=state if state in _STATES else None,
        )

    def to_status(self, variant: str) -> TrainingProgress:
        """The operator's status.training entry for this record."""
        return TrainingProgress(
            variant=variant,
            step=self.step,
            total_steps=self.total_steps,
            percent=self.percent,
            **{name: getattr(self, name) for name in _FLOAT_FIELDS},
            updated_at=self.updated_at,
        )


_FIELD_NAMES = frozenset(f.name for f in fields(ProgressRecord))
_FLOAT_FIELDS = ("loss", "clm_loss", "fusion_loss", "tokens_per_second", "learning_rate", "eta_seconds")


def parse_progress(raw: bytes | str | Mapping[str, Any] | None) -> ProgressRecord | None:
    """A progress.json (its bytes, text or parsed object) as a record; None when it is not usable (absent,
    not JSON, not an object, step or total_steps not integers). What the operator calls."""
    if raw is None:
        return None
    try:
        doc = json.loads(raw) if isinstance(raw, bytes | str) else raw
        return ProgressRecord.from_json(doc) if isinstance(doc, Mapping) else None
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------------
# history.jsonl


@dataclass(frozen=True)
class StepRow:
    """One logged optimizer step."""

    step: int
    loss: float | None
    clm_loss: float | None = None
    fusion_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    tokens: int | None = None
    time: str | None = None  # when it was logged (RFC 3339, UTC)

    kind = "step"


@dataclass(frozen=True)
class AttemptRow:
    """An attempt's start: training (re)started after `start_step` steps (a resume, or 0)."""

    attempt: int  # 1, 2, ... within this training
    start_step: int
    total_steps: int
    world_size: int
    started_at: str | None = None

    kind = "attempt"


Row = StepRow | AttemptRow
_ROW_TYPES: dict[str, type[StepRow] | type[AttemptRow]] = {"step": StepRow, "attempt": AttemptRow}


def _row_from_json(obj: Any) -> Row | None:
    if not isinstance(obj, dict) or obj.get("kind") not in _ROW_TYPES:
        return None
    cls = _ROW_TYPES[obj["kind"]]
    try:
        return cls(**{f.name: obj[f.name] for f in fields(cls) if f.name in obj})
    except TypeError:  # a required field missing
        return None


@dataclass
class TrainingHistory:
    rows: list[Row] = field(default_factory=list)

    @classmethod
    def from_jsonl(cls, text: str) -> TrainingHistory:
        """Unreadable lines are skipped (the report shows what can be read)."""
        rows = []
        for line in text.splitlines():
            try:
                row = _row_from_json(json.loads(line))
            except ValueError:
                row = None
            if row is not None:
                rows.append(row)
        return cls(rows)

    def to_jsonl(self) -> str:
        return "".join(json.dumps({"kind": r.kind, **asdict(r)}, sort_keys=True) + "\n" for r in self.rows)

    def steps(self) -> list[StepRow]:
        return [r for r in self.rows if isinstance(r, StepRow)]

    def attempts(self) -> list[AttemptRow]:
        return [r for r in self.rows if isinstance(r, AttemptRow)]

    def start_attempt(
        self, start_step: int, total_steps: int, world_size: int, started_at: str | None
    ) -> None:
        """Training (re)starts after `start_step` steps: drop what was logged after that step (it was never
        checkpointed and is about to be redone), then record the attempt. From step 0 it is a new training
        (first run, --force, or changed settings whose checkpoints were dropped): the history restarts."""
        if start_step == 0:
            self.rows = []
        else:
            self.rows = [r for r in self.rows if _row_step(r) <= start_step]
        n = len(self.attempts()) + 1
        self.rows.append(AttemptRow(n, start_step, total_steps, world_size, started_at))

    def add_step(self, row: StepRow) -> None:
        """Append a step; a row for the same or a later step (should one exist) is replaced, not doubled."""
        while self.rows and isinstance(self.rows[-1], StepRow) and self.rows[-1].step >= row.step:
            self.rows.pop()
        self.rows.append(row)

    def curve(self, key: str = "loss") -> list[tuple[int, float]]:
        """(step, value) of `key` (a StepRow field: loss, clm_loss, fusion_loss, ...), steps with a value."""
        return [(r.step, float(v)) for r in self.steps() if isinstance(v := getattr(r, key), int | float)]


def _row_step(row: Row) -> int:
    return row.step if isinstance(row, StepRow) else row.start_step


# --------------------------------------------------------------------------------------------------
# reading them from a store (jobs.store.Store or anything with exists/get_bytes)


def read_progress(store: Any, variant: str) -> ProgressRecord | None:
    key = progress_key(variant)
    return parse_progress(store.get_bytes(key)) if store.exists(key) else None


def read_history(store: Any, variant: str) -> TrainingHistory | None:
    """The stored history, None when the run wrote none (a run made before histories existed)."""
    key = history_key(variant)
    if not store.exists(key):
        return None
    return TrainingHistory.from_jsonl(store.get_bytes(key).decode("utf-8", errors="replace"))
