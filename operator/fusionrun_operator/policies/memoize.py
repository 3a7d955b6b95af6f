"""Memoization policy ("extract once, fuse many", jobs.cache): a ready task of a cacheable stage (prepare,
extract, align) whose outputs another task already made is not run again.

For each due task, what store_view and the runtime's claims found (observations.SharedOutput):
- hit (a complete entry of its content key): an "adopt" effect (jobs.complete.adopt, applied by the I/O
  layer: the run's manifest points at the entry) and the record Succeeded, reason Memoized, with its
  memoization (the key, the run and task that made the entry); no Job.
- producer (another run's task makes the same output now: its claim in this operator, or its lease in
  the store): the task waits, Pending with reason WaitingForSharedOutput naming that run, and adopts the
  entry once it is there (a later pass: the claim's release wakes the run, else it looks again after
  WAIT_POLL_SECONDS).
- otherwise (a miss; or no lookup: an identity not recorded yet, the store unread, reuse off): the start
  policy starts its Job as before; the Job adopts inside if an entry appears meanwhile.

Events stay bounded: one per task up to EVENTS_PER_STAGE tasks of a stage in a pass, else one summary.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from fusionrun_operator.effects import Adoption, Event, Transition
from fusionrun_operator.observations import SharedOutput
from jobs.status import WAITING, Memoization, TaskStatus
from jobs.transitions import MEMO_KEY_CHARS, memo_source, memoized

if TYPE_CHECKING:
    from jobs.plan import Task

EVENTS_PER_STAGE = 5
WAIT_POLL_SECONDS = 10.0  # a waiting run looks again this often (a released claim wakes it at once)


@dataclass(frozen=True)
class Shared:
    """The due tasks split by what the shared cache said."""

    adopted: list[Transition]  # Succeeded (Memoized), each with its adopt effect
    waiting: list[Transition]  # Pending, waiting for another run's task
    rest: list[Task]  # start as before

    @property
    def requeue_after(self) -> float | None:
        """Adopting makes dependants ready: look again at once; a waiting task: after WAIT_POLL_SECONDS."""
        return 0.0 if self.adopted else WAIT_POLL_SECONDS if self.waiting else None


def memoization(found: SharedOutput) -> Memoization:
    return Memoization(
        hit=True, key=(found.key or "")[:MEMO_KEY_CHARS], from_run=found.from_run, from_task=found.from_task
    )


def source(found: SharedOutput) -> str:
    """Where an entry came from, for people (jobs.transitions.memo_source)."""
    return memo_source(memoization(found))


def waiting_record(rec: TaskStatus, found: SharedOutput) -> TaskStatus:
    message = f"waiting for {found.producer}, which makes the same outputs (shared cache)"
    return rec.model_copy(update={"state": "Pending", "reason": WAITING, "message": message})


def memoize(
    due: Sequence[Task], tasks: Mapping[str, TaskStatus], shared: Mapping[str, SharedOutput], now: datetime
) -> Shared:
    adopted: list[tuple[Task, Transition]] = []
    waiting: list[tuple[Task, Transition]] = []
    rest: list[Task] = []
    for task in due:
        found, rec = shared.get(task.id), tasks[task.id]
        if found is not None and found.hit and found.key:
            adoption = (Adoption(task.id, found.key),)
            adopted.append((task, Transition(memoized(rec, memoization(found), now=now), adopt=adoption)))
        elif found is not None and found.producer:
            waiting.append((task, Transition(waiting_record(rec, found))))
        else:
            rest.append(task)
    memo_events = _bounded(adopted, "TaskMemoized", lambda t, tr: f"{t.id}: {tr.record.message}", _from)
    newly = [(t, tr) for t, tr in waiting if tasks[t.id].reason != WAITING]  # said once, when it starts
    wait_events = _bounded(newly, WAITING, lambda t, tr: f"{t.id}: {tr.record.message}", _producers)
    return Shared(_attach(adopted, memo_events), _attach(waiting, wait_events), rest)


def _from(items: Sequence[tuple[Task, Transition]]) -> str:
    runs = sorted({tr.record.memoized.from_run or "?" for _, tr in items if tr.record.memoized})
    return f"{len(items)} tasks memoized (shared cache), made by {_few(runs)}"


def _producers(items: Sequence[tuple[Task, Transition]]) -> str:
    return f"{len(items)} tasks wait for other runs making the same outputs (shared cache)"


def _few(names: Sequence[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


Describe = Callable[["Task", Transition], str]


def _bounded(
    items: Sequence[tuple[Task, Transition]],
    reason: str,
    one: Describe,
    summary: Callable[[Sequence[tuple[Task, Transition]]], str],
) -> dict[str, list[Event]]:
    """Events by stage: one per task, or one summary for a stage with more than EVENTS_PER_STAGE."""
    by_stage: dict[str, list[tuple[Task, Transition]]] = {}
    for item in items:
        by_stage.setdefault(item[0].stage.value, []).append(item)
    out = {}
    for stage, group in by_stage.items():
        if len(group) <= EVENTS_PER_STAGE:
            out[stage] = [Event("Normal", reason, one(t, tr)) for t, tr in group]
        else:
            out[stage] = [Event("Normal", reason, f"{stage}: {summary(group)}")]
    return out


def _attach(items: Sequence[tuple[Task, Transition]], events: Mapping[str, list[Event]]) -> list[Transition]:
    """The transitions, each stage's events on its first one."""
    out, seen = [], set()
    for task, tr in items:
        stage = task.stage.value
        if stage in events and stage not in seen:
            seen.add(stage)
            tr = Transition(tr.record, tr.create, tr.delete, tuple(events[stage]), tr.adopt)
        out.append(tr)
    return out
