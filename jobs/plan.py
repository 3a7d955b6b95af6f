"""What a FusionRun needs to do, as a DAG of tasks: pure functions, no I/O.

The same DAG drives the local runner (subprocesses) and the operator (Kubernetes Jobs), so both paths run
the same work. A task is the unit of retry and of skipping: its output in the store carries a manifest,
and a task whose manifest is complete (for the same inputs) is never run again.

Names: a stage is called the same in the spec, the task id, the Job's labels, the status entry, the
store's key prefix and the CLI (`python -m jobs extract --model NAME --shard N`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from jobs.spec import FusionRunSpec


class Stage(str, Enum):
    prepare = "prepare"
    extract = "extract"
    align = "align"
    fuse = "fuse"
    train = "train"
    evaluate = "evaluate"


STAGE_ORDER: tuple[Stage, ...] = tuple(Stage)


class TaskState(str, Enum):
    pending = "Pending"
    running = "Running"
    succeeded = "Succeeded"
    failed = "Failed"


@dataclass(frozen=True)
class Task:
    stage: Stage
    model: str | None = None  # extract: any model; align: a source
    shard: int | None = None  # extract, align, fuse
    variant: str | None = None  # train: "fused" or "clm"
    deps: tuple[str, ...] = field(default=(), compare=False)

    @property
    def id(self) -> str:
        parts = [self.stage.value]
        if self.variant and self.variant != "fused":
            parts.append(self.variant)
        if self.model:
            parts.append(self.model)
        if self.shard is not None:
            parts.append(f"{self.shard:05d}")
        return "-".join(parts)

    def args(self) -> list[str]:
        """Command-line arguments after `python -m jobs` that run exactly this task."""
        a = [self.stage.value]
        if self.model:
            a += ["--model", self.model]
        if self.shard is not None:
            a += ["--shard", str(self.shard)]
        if self.variant:
            a += ["--variant", self.variant]
        return a

    @property
    def distributed(self) -> bool:
        return self.stage is Stage.train


def build_dag(spec: FusionRunSpec) -> list[Task]:
    """All tasks of a run in a topological order (stage order, then model, then shard)."""
    shards = range(spec.extraction.shards)
    target = spec.target.name
    tasks: list[Task] = [Task(Stage.prepare)]
    for m in spec.models:
        tasks += [Task(Stage.extract, model=m.name, shard=s, deps=("prepare",)) for s in shards]
    for src in spec.sources:
        for s in shards:
            deps = (Task(Stage.extract, target, s).id, Task(Stage.extract, src.name, s).id)
            tasks.append(Task(Stage.align, model=src.name, shard=s, deps=deps))
    for s in shards:
        deps = [Task(Stage.extract, target, s).id] + [
            Task(Stage.align, src.name, s).id for src in spec.sources
        ]
        tasks.append(Task(Stage.fuse, shard=s, deps=tuple(deps)))
    fused = tuple(Task(Stage.fuse, shard=s).id for s in shards)
    tasks.append(Task(Stage.train, variant="fused", deps=fused))
    train_ids = [Task(Stage.train, variant="fused").id]
    if spec.training.clm_baseline:
        tasks.append(Task(Stage.train, variant="clm", deps=fused))
        train_ids.append(Task(Stage.train, variant="clm").id)
    if spec.evaluation.enabled:
        tasks.append(Task(Stage.evaluate, deps=("prepare", *train_ids)))
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


def run_state(dag: Iterable[Task], states: Mapping[str, TaskState]) -> TaskState:
    """One state for the whole run: Failed if any task failed, Succeeded when all did, else Running or
    Pending (nothing started yet)."""
    values = [states.get(t.id, TaskState.pending) for t in dag]
    if any(v is TaskState.failed for v in values):
        return TaskState.failed
    if values and all(v is TaskState.succeeded for v in values):
        return TaskState.succeeded
    if any(v is not TaskState.pending for v in values):
        return TaskState.running
    return TaskState.pending


def stage_of(task_id: str) -> Stage:
    return Stage(task_id.split("-", 1)[0])
