"""What reconcile decides, as data: the effects of one pass, carried out afterwards by the I/O modules
(kube.apply_effects, store_view.invalidate). Policies return `Transition`s; the engine accumulates them
into one `Effects`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from jobs.status import FusionRunStatus, TaskStatus


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Adoption:
    """Make a task complete from the shared cache's entry of its content key (jobs.complete.adopt): its
    manifest points at the entry; no Job runs."""

    task_id: str
    key: str


@dataclass(frozen=True)
class Transition:
    """One task's new record and the effects that go with it."""

    record: TaskStatus
    create: tuple[dict[str, Any], ...] = ()  # Services first, then Jobs
    delete: tuple[str, ...] = ()  # Job names
    events: tuple[Event, ...] = ()
    adopt: tuple[Adoption, ...] = ()


@dataclass
class Effects:
    """Everything one pass asks for. Applied in this order: invalidate, adopt, delete, create, events,
    status."""

    status: FusionRunStatus
    create: list[dict[str, Any]] = field(default_factory=list)  # Services first, then Jobs
    delete_jobs: list[str] = field(default_factory=list)
    invalidate: list[str] = field(default_factory=list)  # task ids whose store manifests to drop
    adopt: list[Adoption] = field(default_factory=list)  # tasks made from the shared cache (store writes)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None  # seconds until something is due (a retry)

    def take(self, tr: Transition) -> TaskStatus:
        """Accumulate a transition's effects; return its record."""
        self.create += tr.create
        self.delete_jobs += tr.delete
        self.events += tr.events
        self.adopt += tr.adopt
        return tr.record
