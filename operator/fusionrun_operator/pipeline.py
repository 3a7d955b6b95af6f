"""The run's pipeline for one pass: the spec validated once and the task DAG built once, then handed to
everything that needs them (the store view, reconcile's policies).

The only operator module that imports jobs.plan at run time: the DAG, the stage order and "this stage and
later ones" (restartFrom) are asked of a Pipeline, never of jobs.plan directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from fusionrun_operator.config import OperatorConfig
from fusionrun_operator.k8s_objects import effective_spec
from jobs.plan import build_dag, downstream
from jobs.registry import STAGE_NAMES, Stage, Task
from jobs.spec import FusionRunSpec, SpecError, parse_spec

# Stage names in pipeline order (status.stages, conditions and the phase message follow it).
STAGES: tuple[str, ...] = STAGE_NAMES


@dataclass(frozen=True)
class InvalidSpec:
    """A spec that does not validate (cross-field rules the CRD schema cannot express)."""

    message: str  # pydantic's, every bad field named


@dataclass(frozen=True)
class Pipeline:
    spec: FusionRunSpec  # the effective spec: what the Jobs run with (config's default store applied)
    tasks: tuple[Task, ...]  # topological order

    @cached_property
    def by_id(self) -> dict[str, Task]:
        return {t.id: t for t in self.tasks}

    def from_stage(self, stage: str) -> list[Task]:
        """Tasks of `stage` and every later stage: what a restart from `stage` reruns."""
        return downstream(self.tasks, Stage(stage))

    @property
    def train_tasks(self) -> list[Task]:
        return [t for t in self.tasks if t.stage is Stage.train]

    def any_done(self, stage: str, completed: frozenset[str]) -> bool:
        return any(t.stage.value == stage and t.id in completed for t in self.tasks)


def parse_pipeline(raw_spec: Mapping[str, Any], config: OperatorConfig) -> Pipeline | InvalidSpec:
    """The run's .spec -> its pipeline, or why the spec is invalid (reconcile turns that into status)."""
    try:
        spec = effective_spec(parse_spec(dict(raw_spec)), config)
    except SpecError as err:
        return InvalidSpec(str(err))
    return Pipeline(spec, tuple(build_dag(spec)))
