"""What a FusionRun needs to do, as a DAG of tasks: pure functions, no I/O.

The same DAG drives the local runner (subprocesses) and the operator (Kubernetes Jobs), so both paths run
the same work. Stages, task ids and their arguments come from the registry (jobs.registry).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import Enum
from typing import TYPE_CHECKING

from jobs.registry import STAGE_ORDER, Stage, Task, Variant

if TYPE_CHECKING:
    from jobs.spec import FusionRunSpec

__all__ = ["STAGE_ORDER", "Stage", "Task", "TaskState", "build_dag", "downstream", "ready_tasks"]


class TaskState(str, Enum):
    pending = "Pending"
    running = "Running"
    succeeded = "Succeeded"
    failed = "Failed"


def trained_variants(spec: FusionRunSpec) -> list[str]:
    """The variants the run trains: FuseLLM, then each baseline the spec asks for."""
    return spec.trained_variants()


def _fused_by(variant: str) -> str:
    """The fuse variant whose shards a training variant reads (clm trains on FuseLLM's blocks)."""
    return Variant.fused.value if variant == Variant.clm.value else variant


def build_dag(spec: FusionRunSpec) -> list[Task]:
    """All tasks of a run in a topological order (stage order, then model, then shard)."""
    shards = range(spec.extraction.shards)
    target = spec.target.name
    variants = trained_variants(spec)
    fuse_variants = list(dict.fromkeys(_fused_by(v) for v in variants))
    tasks: list[Task] = [Task(Stage.prepare)]
    prepared = tasks[0].id
    for m in spec.models:
        tasks += [Task(Stage.extract, model=m.name, shard=s, deps=(prepared,)) for s in shards]
    for src in spec.sources:
        for s in shards:
            deps = (Task(Stage.extract, target, s).id, Task(Stage.extract, src.name, s).id)
            tasks.append(Task(Stage.align, model=src.name, shard=s, deps=deps))
    for fv in fuse_variants:
        for s in shards:
            teachers = [] if fv == Variant.self.value else spec.sources  # self: the target's own only
            deps = (Task(Stage.extract, target, s).id, *(Task(Stage.align, m.name, s).id for m in teachers))
            tasks.append(Task(Stage.fuse, shard=s, variant=fv, deps=deps))
    train_ids = []
    for v in variants:
        fused = tuple(Task(Stage.fuse, shard=s, variant=_fused_by(v)).id for s in shards)
        task = Task(Stage.train, variant=v, deps=fused)
        tasks.append(task)
        train_ids.append(task.id)
    if spec.evaluation.enabled:
        tasks.append(Task(Stage.evaluate, deps=(prepared, *train_ids)))
    return tasks


def ready_tasks(dag: Iterable[Task], states: Mapping[str, TaskState]) -> list[Task]:
    """Tasks not yet started whose dependencies all succeeded, in DAG order."""
    out = []
    for t in dag:
        if states.get(t.id, TaskState.pending) is not TaskState.pending:
            continue
        if all(states.get(d) is TaskState.succeeded for d in t.deps):
            out.append(t)
    return out


def downstream(dag: Iterable[Task], stage: Stage) -> list[Task]:
    """Tasks of `stage` and every later stage: what a restart from `stage` reruns."""
    start = STAGE_ORDER.index(stage)
    return [t for t in dag if STAGE_ORDER.index(t.stage) >= start]
