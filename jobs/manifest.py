"""Task manifests: what makes a task 'complete', shared by the stage jobs, the local runner and the operator.

A task writes its outputs first and its manifest last (one atomic PUT), so a manifest's presence means the
outputs it lists were all written. The manifest records:

    {task, stage, outputs: {key: {sha256, bytes}}, inputs: {manifest key: digest}, fingerprint,
     counts, started_at, finished_at, summary}

- fingerprint: sha256 of the spec fields that decide this task (`jobs.spec.spec_fingerprint_fields`) plus the
  task's identity (model/shard/variant); a changed field invalidates the task.
- inputs: the digest of each dependency's manifest. The digest covers only what decides content (task,
  outputs, inputs, fingerprint), not timestamps: an upstream task redone with identical outputs keeps its
  dependants valid, while an upstream change invalidates everything downstream, transitively.

Torch-free: the operator imports this module.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from jobs.plan import Stage, Task
from jobs.spec import FusionRunSpec, spec_fingerprint_fields
from jobs.store import Store, StoreError

MANIFEST_VERSION = 1


class ManifestError(RuntimeError):
    """A manifest that cannot be read or does not describe what it should."""


def manifest_key(task: Task) -> str:
    """Where a task's manifest lives (docs/design.md)."""
    st = task.stage
    if st is Stage.prepare:
        return "prepare/manifest.json"
    if st is Stage.extract:
        return f"extract/{task.model}/shard-{task.shard:05d}.manifest.json"
    if st is Stage.align:
        return f"align/{task.model}/shard-{task.shard:05d}.manifest.json"
    if st is Stage.fuse:
        return f"fuse/shard-{task.shard:05d}.manifest.json"
    if st is Stage.train:
        return f"train/{task.variant or 'fused'}/manifest.json"
    if st is Stage.evaluate:
        return "evaluate/manifest.json"
    raise ManifestError(f"no manifest key for stage {st}")


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def fingerprint(spec: FusionRunSpec, task: Task) -> str:
    """sha256 of the spec fields that decide this task's outputs, and of the task's identity."""
    fields = spec_fingerprint_fields(spec, task.stage.value)
    if task.stage is Stage.extract:
        # One model's extraction depends on that model only: editing another model redoes only that one.
        fields = {**fields, "models": {task.model: fields["models"][task.model]}}
    return _sha({"fields": fields, "task": task.id, "version": MANIFEST_VERSION})


def digest(manifest: dict[str, Any]) -> str:
    """The content digest of a manifest (what dependants record): timestamps excluded."""
    return _sha({k: manifest.get(k) for k in ("task", "outputs", "inputs", "fingerprint")})


@dataclass(frozen=True)
class Output:
    sha256: str
    bytes: int


def read_manifest(store: Store, key: str) -> dict[str, Any] | None:
    """The manifest at `key`, or None when absent or unreadable (an unreadable manifest is 'not complete')."""
    if not store.exists(key):
        return None
    try:
        m = json.loads(store.get_bytes(key))
    except (ValueError, StoreError):
        return None
    if not isinstance(m, dict) or not isinstance(m.get("outputs"), dict):
        return None
    return m


def input_digests(store: Store, dag_by_id: dict[str, Task], task: Task) -> dict[str, str]:
    """Digest of each dependency's manifest; raises when a dependency has none (it is not done)."""
    out = {}
    for dep_id in task.deps:
        key = manifest_key(dag_by_id[dep_id])
        m = read_manifest(store, key)
        if m is None:
            raise ManifestError(
                f"task {task.id} needs {dep_id}, which has no manifest at "
                f"{store.uri_for(key)}: run {dep_id} first"
            )
        out[key] = digest(m)
    return out


def build_manifest(
    spec: FusionRunSpec,
    task: Task,
    outputs: dict[str, Output],
    inputs: dict[str, str],
    started_at: float,
    counts: dict[str, Any] | None = None,
    summary: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "version": MANIFEST_VERSION,
        "task": task.id,
        "stage": task.stage.value,
        "outputs": {k: {"sha256": o.sha256, "bytes": o.bytes} for k, o in sorted(outputs.items())},
        "inputs": dict(sorted(inputs.items())),
        "fingerprint": fingerprint(spec, task),
        "counts": counts or {},
        "started_at": started_at,
        "finished_at": time.time(),
        "summary": summary or {},
    }


def write_manifest(store: Store, task: Task, manifest: dict[str, Any]) -> None:
    """Write the manifest: call this LAST, after every output is in the store."""
    store.put_bytes(manifest_key(task), json.dumps(manifest, indent=1, sort_keys=True).encode())


def why_incomplete(
    store: Store, spec: FusionRunSpec, task: Task, dag_by_id: dict[str, Task], verify: bool = False
) -> str | None:
    """None when the task is complete, else a short reason (for logs and tests).

    verify: also recompute the sha256 of every output (reads them: cheap for local stores)."""
    m = read_manifest(store, manifest_key(task))
    if m is None:
        return "no manifest"
    if m.get("fingerprint") != fingerprint(spec, task):
        return "spec changed"
    try:
        inputs = input_digests(store, dag_by_id, task)
    except ManifestError:
        return "an input is missing"
    if m.get("inputs") != inputs:
        return "an input changed"
    for key, o in m["outputs"].items():
        size = store.size(key)
        if size is None:
            return f"output {key} missing"
        if size != o.get("bytes"):
            return f"output {key} has {size} bytes, manifest says {o.get('bytes')}"
        if verify and object_sha256(store, key) != o.get("sha256"):
            return f"output {key} checksum mismatch"
    return None


def task_complete(
    store: Store, spec: FusionRunSpec, task: Task, dag: Iterable[Task] | None = None, verify: bool = False
) -> bool:
    from jobs.plan import build_dag

    by_id = {t.id: t for t in (dag if dag is not None else build_dag(spec))}
    return why_incomplete(store, spec, task, by_id, verify) is None


def completed_tasks(store: Store, spec: FusionRunSpec, dag: Iterable[Task], verify: bool = False) -> set[str]:
    """Ids of the tasks whose outputs are complete for this spec. A task counts only when all its
    dependencies do too (an upstream that must be redone invalidates its dependants' inputs anyway)."""
    dag = list(dag)
    by_id = {t.id: t for t in dag}
    done: set[str] = set()
    for t in dag:  # topological order
        if all(d in done for d in t.deps) and why_incomplete(store, spec, t, by_id, verify) is None:
            done.add(t.id)
    return done


def object_sha256(store: Store, key: str) -> str:
    path = store.local_path(key)
    if path is not None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        return h.hexdigest()
    return hashlib.sha256(store.get_bytes(key)).hexdigest()


def invalidate(store: Store, task: Task) -> None:
    """Drop a task's manifest (its outputs stay until overwritten): the next run redoes the task."""
    store.delete(manifest_key(task))
