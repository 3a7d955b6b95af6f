"""The run's pipeline for one pass: the spec validated once and the task DAG built once, then handed to
everything that needs them (the store view, reconcile's policies).

The only operator module that imports jobs.plan at run time: the DAG, the stage order and "this stage and
later ones" (restartFrom) are asked of a Pipeline, never of jobs.plan directly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from fusionrun_operator.config import OperatorConfig
from fusionrun_operator.k8s_objects import effective_spec
from jobs.plan import build_dag, downstream
from jobs.registry import STAGE_NAMES, Stage, Task
from jobs.spec import FusionRunSpec, SpecError, parse_spec, unknown_fields

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
        return any(t.stage == stage and t.id in completed for t in self.tasks)


def parse_pipeline(
    raw_spec: Mapping[str, Any], config: OperatorConfig, applied: str | None = None
) -> Pipeline | InvalidSpec:
    """The run's .spec -> its pipeline, or why the spec is invalid (reconcile turns that into status).

    applied: the run's kubectl.kubernetes.io/last-applied-configuration annotation (what `kubectl apply`,
    Argo CD and others last sent, before the API server pruned the fields its schema does not declare):
    a field written there that FusionRun does not know makes the spec invalid, naming it."""
    dropped = pruned_fields(applied, raw_spec)
    note = f"\n  {PRUNED_NOTE}" if dropped else ""
    try:
        spec = effective_spec(parse_spec(dict(raw_spec)), config)
    except SpecError as err:
        return InvalidSpec(str(err).replace("invalid FusionRun:", f"invalid FusionRun:{dropped}", 1) + note)
    if dropped:
        return InvalidSpec(f"invalid FusionRun:{dropped}{note}")
    return Pipeline(spec, tuple(build_dag(spec)))


LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
PRUNED_NOTE = "(fields the API server dropped: they were in the last applied configuration)"
_MISSING = object()


def pruned_fields(applied: str | None, stored_spec: Mapping[str, Any]) -> str:
    """'\n  path: unknown field; did you mean X?' for each unknown field of the last applied
    configuration; "" when there is none, the annotation is not a JSON object, or it is stale (the spec was
    changed since by other means: a field it wrote differs from the stored one)."""
    try:
        doc = json.loads(applied) if applied else None
    except ValueError:
        return ""
    if not isinstance(doc, dict):
        return ""
    unknown = dict(unknown_fields(doc))
    if not unknown or not _written_as_stored(doc.get("spec"), stored_spec, "spec", set(unknown)):
        return ""
    return "".join(f"\n  {path}: {msg}" for path, msg in unknown.items())


def _written_as_stored(written: Any, stored: Any, path: str, unknown: set[str]) -> bool:
    """Whether every known value `written` holds is what the API server stored (defaults aside)."""
    if path in unknown or written is None:
        return True
    if isinstance(written, dict):
        return isinstance(stored, dict) and all(
            _written_as_stored(v, stored.get(k, _MISSING), f"{path}.{k}", unknown) for k, v in written.items()
        )
    if isinstance(written, list):
        return (
            isinstance(stored, list)
            and len(stored) == len(written)
            and all(
                _written_as_stored(w, s, f"{path}.{i}", unknown)
                for i, (w, s) in enumerate(zip(written, stored, strict=True))
            )
        )
    return written == stored
