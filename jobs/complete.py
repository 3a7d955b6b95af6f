"""When is a task complete, and if not, why: the one rule the local runner, every stage (training
included) and the operator apply.

A task writes its outputs first and its completion record (the task manifest) last, in one atomic PUT, so
a manifest's presence means the outputs it lists were all written. The manifest records:

    {task, stage, outputs: {key: {sha256, bytes}}, inputs: {manifest key: digest}, fingerprint,
     counts, started_at, finished_at, summary}

A task is complete when, in this order:
1. its manifest exists and is readable;
2. its fingerprint matches: sha256 of the spec fields that decide it (jobs.registry.fingerprint_fields)
   plus the task's identity; a changed field invalidates the task;
3. its inputs match: the digest of each dependency's manifest, as recorded; the digest covers only what
   decides content (task, outputs, inputs, fingerprint), not timestamps, so an upstream task redone with
   identical outputs keeps its dependants valid while an upstream change invalidates everything after it;
4. every output it lists is in the store with the recorded size (and, under the `verify` policy, sha256);
5. the texts it read are unchanged (under the `texts` policy): prepare records a stamp of the corpus
   (jobs.corpus.corpus_stamp: local paths, sizes, mtimes; s3:// keys, sizes, ETags), evaluate those of
   evaluation.corpora, so a corpus edited in place makes them stale although the spec did not change.

The policy says which checks that cost I/O apply: re-hashing outputs is cheap for a local store, a
download for S3; stamping texts lists the corpus. Torch-free: the operator imports this module.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jobs.cache import (
    CACHEABLE,
    Entry,
    Identities,
    add_user,
    cache_of,
    drop_entry,
    located,
    read_entry,
    task_key,
)
from jobs.corpus import corpus_stamp
from jobs.locations import stamp
from jobs.registry import CacheLayout, Layout, Stage, Task, fingerprint_fields, legacy_fingerprint_fields
from jobs.store import LocalStore, Store, StoreError, endpoint_of

if TYPE_CHECKING:
    from jobs.spec import FusionRunSpec

MANIFEST_VERSION = 1


class ManifestError(RuntimeError):
    """A manifest that cannot be read or does not describe what it should."""


@dataclass(frozen=True)
class Policy:
    """Which I/O-costly checks decide completeness (see the module docstring)."""

    verify: bool = False  # recompute each output's sha256
    texts: bool = False  # re-stamp the corpus / evaluation texts

    @classmethod
    def for_store(cls, store: Store, texts: bool = True) -> Policy:
        """Stages and the local runner: verify local outputs (cheap), stamp texts. The operator passes
        texts=False: listing a corpus every pass is too costly (it reruns on restartFrom instead)."""
        return cls(verify=isinstance(store, LocalStore), texts=texts)


@dataclass(frozen=True)
class Output:
    sha256: str
    bytes: int


# --------------------------------------------------------------------------------------------------
# The record


def manifest_key(task: Task) -> str:
    return Layout.manifest(task)


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def fingerprint(spec: FusionRunSpec, task: Task) -> str:
    """sha256 of the spec fields that decide this task's outputs, and of the task's identity."""
    return _fingerprint_of(fingerprint_fields(spec.model_dump(mode="json", by_alias=True), task), task)


def accepted_fingerprints(spec: FusionRunSpec, task: Task) -> set[str]:
    """The fingerprint a manifest written now gets, and those earlier releases wrote for the same
    settings (jobs.registry.legacy_fingerprint_fields)."""
    spec_json = spec.model_dump(mode="json", by_alias=True)  # once: this runs for every task checked
    every = [fingerprint_fields(spec_json, task), *legacy_fingerprint_fields(spec_json, task)]
    return {_fingerprint_of(fields, task) for fields in every}


def _fingerprint_of(fields: dict[str, Any], task: Task) -> str:
    return _sha({"fields": fields, "task": task.id, "version": MANIFEST_VERSION})


def digest(manifest: dict[str, Any]) -> str:
    """The content digest of a manifest (what dependants record): timestamps excluded."""
    return _sha({k: manifest.get(k) for k in ("task", "outputs", "inputs", "fingerprint")})


def read_manifest(store: Store, task_or_key: Task | str) -> dict[str, Any] | None:
    """A task's manifest, or None when absent or unreadable (an unreadable manifest is 'not complete')."""
    key = task_or_key if isinstance(task_or_key, str) else manifest_key(task_or_key)
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
    """Digest of each dependency's manifest; raises ManifestError when one has none (it is not done)."""
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
    *,
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


def invalidate(store: Store, task: Task) -> None:
    """Drop a task's manifest (its outputs stay until overwritten): the next run redoes the task."""
    store.delete(manifest_key(task))


# --------------------------------------------------------------------------------------------------
# The rule


def why_incomplete(
    store: Store, spec: FusionRunSpec, task: Task, dag_by_id: dict[str, Task], policy: Policy = Policy()
) -> str | None:
    """None when the task is complete, else a short reason (for logs, events and tests)."""
    m = read_manifest(store, task)
    if m is None:
        return "no manifest"
    if m.get("fingerprint") not in accepted_fingerprints(spec, task):
        return "spec changed"
    try:
        inputs = input_digests(store, dag_by_id, task)
    except ManifestError:
        return "an input is missing"
    if m.get("inputs") != inputs:
        return "an input changed"
    reason = _outputs_problem(store, m, policy.verify)
    if reason is None and policy.texts:
        reason = texts_changed(store, spec, task, m) or _content_changed(store, spec, task, dag_by_id, m)
    return reason


def _outputs_problem(store: Store, manifest: dict[str, Any], verify: bool) -> str | None:
    for key, o in manifest["outputs"].items():
        where, physical = located(store, manifest, key)
        size = where.size(physical)
        if size is None:
            return f"output {key} missing"
        if size != o.get("bytes"):
            return f"output {key} has {size} bytes, manifest says {o.get('bytes')}"
        if verify and object_sha256(where, physical) != o.get("sha256"):
            return f"output {key} checksum mismatch"
    return None


def _content_changed(
    store: Store, spec: FusionRunSpec, task: Task, dag_by_id: dict[str, Task], manifest: dict[str, Any]
) -> str | None:
    """A task made from the shared cache records its content key: files edited in place (a model's
    weights, the corpus) change the key although the spec did not."""
    recorded = manifest.get("cache_key")
    if recorded is None or task.stage not in CACHEABLE:
        return None
    return None if content_key(store, spec, task, dag_by_id) == recorded else "an input's files changed"


# --------------------------------------------------------------------------------------------------
# Outputs shared across runs (jobs.cache)


def read_outputs(store: Store, task: Task, dag_by_id: dict[str, Task]) -> dict[str, str]:
    """sha256 of each output of `task`'s dependencies that it reads, by logical key: what its cache key
    is made of (the documents of its shard; for align, also both extractions). Raises ManifestError when a
    dependency is not complete."""
    out: dict[str, str] = {}
    wanted = [dag_by_id[d] for d in task.deps]
    if task.stage is Stage.align:  # exact alignment reads the documents through its extractions
        wanted.append(dag_by_id[Task(Stage.prepare).id])
    for dep in wanted:
        m = read_manifest(store, dep)
        if m is None:
            raise ManifestError(f"task {task.id} needs {dep.id}, which is not complete: run it first")
        keys = [Layout.documents(task.shard)] if dep.stage is Stage.prepare else [Layout.shard(dep)]
        out |= {k: m["outputs"][k]["sha256"] for k in keys if k in m["outputs"]}
    return out


def content_key(
    store: Store, spec: FusionRunSpec, task: Task, dag_by_id: dict[str, Task], ids: Identities | None = None
) -> str:
    """The task's key in the shared cache (jobs.cache.task_key) from its inputs and the identities of the
    files it reads: stamped now (default), or as recorded (the operator: Identities.recorded)."""
    ids = ids or Identities.live_for(store, spec)
    return task_key(spec, task, ids, read_outputs(store, task, dag_by_id) if task.deps else {})


def adopt(
    store: Store, spec: FusionRunSpec, task: Task, dag_by_id: dict[str, Task], run: str, key: str
) -> dict[str, Any] | None:
    """Make `task` complete from the shared cache when an entry of its key exists: its manifest points
    at the entry (nothing runs). Returns the manifest written, or None on a miss."""
    cache = cache_of(store)
    entry = read_entry(cache, task.stage, key)
    if entry is None:
        return None
    outputs = {CacheLayout.logical_key(task, n): o for n, o in entry_outputs(entry).items()}
    if isinstance(store, LocalStore) and any(
        object_sha256(cache, entry.file(n)) != o.sha256 for n, o in entry_outputs(entry).items()
    ):
        drop_entry(cache, task.stage, key)  # corrupt: never used, redone
        return None
    inputs = input_digests(store, dag_by_id, task)
    summary = {**entry.record.get("summary", {}), "reused_from": entry.record.get("created_by")}
    manifest = build_manifest(
        spec,
        task,
        outputs=outputs,
        inputs=inputs,
        started_at=time.time(),
        counts=entry.record.get("counts"),
        summary=summary,
    )
    manifest |= {"entry": entry.prefix, "cache_key": key}
    add_user(cache, entry, run, manifest_key(task))
    write_manifest(store, task, manifest)
    return manifest


def entry_outputs(entry: Entry) -> dict[str, Output]:
    """The entry's files (by name) and their checksums."""
    return {name: Output(o["sha256"], o["bytes"]) for name, o in entry.record["outputs"].items()}


def completed_tasks(
    store: Store, spec: FusionRunSpec, dag: Iterable[Task], policy: Policy = Policy()
) -> set[str]:
    """Ids of the tasks whose outputs are complete for this spec. A task counts only when all its
    dependencies do too (an upstream that must be redone invalidates its dependants' inputs anyway)."""
    dag = list(dag)
    by_id = {t.id: t for t in dag}
    done: set[str] = set()
    for t in dag:  # topological order
        if all(d in done for d in t.deps) and why_incomplete(store, spec, t, by_id, policy) is None:
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


# --------------------------------------------------------------------------------------------------
# Texts read by a task (corpus stamps)


def text_stamps(store: Store, spec: FusionRunSpec, task: Task) -> dict[str, Any]:
    """What a task records in its summary about the texts it reads, taken BEFORE reading them (an edit
    during the read then makes the next run redo it). prepare: the corpus; evaluate: evaluation.corpora."""
    s3 = endpoint_of(store, spec.store)
    if task.stage is Stage.prepare:
        return {"corpus_stamp": corpus_stamp(spec.corpus, s3)}
    out: dict[str, Any] = {}
    if task.stage is Stage.evaluate and spec.evaluation.corpora:
        out["corpora_stamps"] = {c.name: corpus_stamp(c, s3) for c in spec.evaluation.corpora}
    if task.stage is Stage.evaluate and spec.evaluation.task_dirs:  # the user's benchmark task folders
        out["task_dir_stamps"] = [stamp(d, s3) for d in spec.evaluation.task_dirs]
    return out


def texts_changed(
    store: Store, spec: FusionRunSpec, task: Task, manifest: dict[str, Any] | None = None
) -> str | None:
    """Why a task complete by its manifest must still be redone: a text it read changed although the spec
    did not. None when nothing changed (or nothing was recorded). StoreError when S3 cannot be listed."""
    if task.stage not in (Stage.prepare, Stage.evaluate):
        return None
    m = manifest if manifest is not None else read_manifest(store, task)
    recorded = (m or {}).get("summary", {})
    what = {
        "corpus_stamp": "corpus changed",
        "corpora_stamps": "evaluation corpus changed",
        "task_dir_stamps": "evaluation task folder changed",
    }
    for name, now in text_stamps(store, spec, task).items():
        if recorded.get(name) is not None and recorded[name] != now:
            return what[name]
    return None
