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
from jobs.derive import derive_status
from jobs.plan import build_dag, trained_variants
from jobs.progress import read_progress
from jobs.registry import Layout, Stage
from jobs.spec import FusionRunSpec, parse_spec
from jobs.status import (
    FusionRunStatus,
    TaskStatus,
    TrainingProgress,
    alignment_diagnostics,
    parse_status,
)
from jobs.store import Store, StoreError
from jobs.transitions import completed, invalidated


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


def artifacts_uri(store: Store) -> str:
    """Where the run's artifacts are (status.artifactsUri): <store uri>/<run>/."""
    return store.base_uri.rstrip("/") + "/"


def training_from_store(store: Store, spec: FusionRunSpec) -> dict[str, TrainingProgress]:
    """Variant -> its training progress, for the variants whose train task wrote one."""
    found = {v: read_progress(store, v) for v in trained_variants(spec)}
    return {v: rec.to_status(v) for v, rec in found.items() if rec is not None}


def store_status(
    store: Store, spec: FusionRunSpec, recorded: FusionRunStatus | None = None, now: datetime | None = None
) -> FusionRunStatus:
    """The run's status (jobs.derive): task records (the local runner's, when it left some) updated by
    the store's completion records (jobs.transitions), training progress and final metrics."""
    when = now or datetime.now(timezone.utc)
    old = recorded or parse_status(read_json(store, Layout.STATUS))
    dag = build_dag(spec)
    done = completed_tasks(store, spec, dag, Policy())
    known = {t.id: t for t in old.tasks}
    records = {
        t.id: _with_store(known.get(t.id) or TaskStatus(id=t.id, stage=t.stage.value), t.id in done, when)
        for t in dag
    }
    evaluated = any(t.stage is Stage.evaluate and t.id in done for t in dag)
    return derive_status(
        old=old,
        dag=dag,
        records=records,
        now=when,
        artifacts_uri=artifacts_uri(store),
        progress=training_from_store(store, spec),
        metrics=read_json(store, Layout.METRICS) if evaluated else None,
        alignment=alignment_from_store(store, dag, done),
    )


def _with_store(rec: TaskStatus, complete: bool, now: datetime) -> TaskStatus:
    """A record as the store's completion records have it: complete ones succeeded, a success the store
    no longer vouches for is to be done again."""
    if complete:
        return completed(rec, now=now)
    return invalidated(rec) if rec.state == "Succeeded" else rec
