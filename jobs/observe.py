"""A run's status from what its store holds: the same status model (jobs.status) whichever backend made it.

The operator writes FusionRun.status from Jobs and the store; the local runner keeps its task records in
the store (`status.json`, Layout.STATUS) as it goes. `fusionrun status NAME` merges those records with the
store's completion records (jobs.complete), training progress and metrics, so it works for a run made by
either backend, from any machine that can read the store.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from jobs.complete import Policy, completed_tasks, read_manifest
from jobs.plan import build_dag, trained_variants
from jobs.progress import read_progress
from jobs.registry import STAGE_NAMES, Layout, Stage
from jobs.spec import FusionRunSpec, parse_spec
from jobs.status import (
    FusionRunStatus,
    TaskStatus,
    alignment_diagnostics,
    conditions,
    parse_status,
    stage_entry,
)
from jobs.store import Store, StoreError


def iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_json(store: Store, key: str) -> Any:
    """A JSON object of the store, or None when absent or unreadable."""
    try:
        return json.loads(store.get_bytes(key)) if store.exists(key) else None
    except (StoreError, ValueError):
        return None


def recorded_spec(store: Store) -> FusionRunSpec | None:
    """The spec a run's tasks last ran with (jobs.stages.common.record_spec), or None."""
    raw = read_json(store, Layout.SPEC)
    return parse_spec(raw) if isinstance(raw, dict) else None


def alignment_from_store(store: Store, dag: list[Any], done: set[str] | frozenset[str]) -> dict[str, Any]:
    """Per source, the alignment diagnostics of its complete align tasks (jobs.status.alignment_diagnostics);
    empty until every align task is complete (then read once: a pass's manifests are usually cached)."""
    aligns = [t for t in dag if t.stage is Stage.align]
    if not aligns or any(t.id not in done for t in aligns):
        return {}
    per_source: dict[str, list[dict[str, Any]]] = {}
    for t in aligns:
        m = read_manifest(store, t) or {}
        diag = m.get("summary", {}).get("diagnostics")
        if isinstance(diag, dict):
            per_source.setdefault(t.model, []).append(diag)
    return alignment_diagnostics(per_source)


def store_status(
    store: Store, spec: FusionRunSpec, recorded: FusionRunStatus | None = None, now: datetime | None = None
) -> FusionRunStatus:
    """The run's status: task records (the local runner's, when it left some) updated by the store's
    completion records, per-stage entries, conditions, training progress and final metrics."""
    now_s = iso(now or datetime.now(timezone.utc))
    old = recorded or parse_status(read_json(store, Layout.STATUS))
    dag = build_dag(spec)
    done = completed_tasks(store, spec, dag, Policy())
    known = {t.id: t for t in old.tasks}
    tasks = [_task_record(t.id, t.stage, known.get(t.id), t.id in done, now_s) for t in dag]
    uri = store.base_uri.rstrip("/") + "/"
    stages_model = type(old.stages)
    stages = stages_model(
        **{
            name: stage_entry(
                [r for r in tasks if r.stage == name], getattr(old.stages, name), uri + name + "/", now_s
            )
            for name in STAGE_NAMES
        }
    )
    stages.align.diagnostics = alignment_from_store(store, dag, done) or None
    phase, message = _phase(tasks)
    current = next((n for n in STAGE_NAMES if getattr(stages, n).state not in ("Succeeded", "Skipped")), None)
    training = [
        rec.to_status(v) for v in trained_variants(spec) if (rec := read_progress(store, v)) is not None
    ]
    evaluated = any(t.stage is Stage.evaluate and t.id in done for t in dag)
    failed = next((r for r in tasks if r.state == "Failed"), None)
    return old.model_copy(
        update={
            "phase": phase,
            "stage": failed.stage if failed else current,
            "progress": f"{len(done)}/{len(dag)}",
            "message": message,
            "conditions": conditions(
                old, phase, failed.reason if failed else None, message, stages, None, now_s
            ),
            "stages": stages,
            "tasks": tasks,
            "training": training,
            "metrics": read_json(store, Layout.METRICS) if evaluated else None,
            "artifacts_uri": uri,
        }
    )


def _task_record(
    task_id: str, stage: Stage, old: TaskStatus | None, complete: bool, now_s: str
) -> TaskStatus:
    rec = old or TaskStatus(id=task_id, stage=stage.value)
    if complete and rec.state != "Succeeded":
        return rec.model_copy(update={"state": "Succeeded", "reason": "Completed", "completion_time": now_s})
    if not complete and rec.state == "Succeeded":  # the store no longer vouches for it
        return rec.model_copy(update={"state": "Pending", "reason": "OutputsInvalidated"})
    return rec


def _phase(tasks: list[TaskStatus]) -> tuple[str, str]:
    states = [r.state for r in tasks]
    n_done = states.count("Succeeded")
    failed = next((r for r in tasks if r.state == "Failed"), None)
    if failed is not None:
        return "Failed", f"{failed.id}: {failed.message or failed.reason or 'failed'}"
    if n_done == len(tasks):
        return "Succeeded", f"all {len(tasks)} tasks succeeded"
    if any(s in ("Running", "Retrying") for s in states) or n_done:
        return "Running", f"{n_done}/{len(tasks)} tasks done"
    return "Pending", "nothing has run yet"
