"""A run's store as one reconcile pass sees it: completed tasks, training progress, evaluate metrics, read
once before reconcile through a per-pass read cache; plus the one write a pass makes (restartFrom drops
manifests). The only operator module that uses jobs.complete (what makes a task complete).

The store is jobs.store.open_store's, opened with the operator's pass settings (config.pass_settings: short
retries and timeouts, no grace at the bucket check) and an S3 client with the run's keys (read from its
Secret by the caller): the operator must not hang on a store that is down. Keys stay in memory only:
never logged, never in status or events. An unreadable store is "unknown" (completed=None: reconcile then
trusts Job states), never "nothing done".

Bounded reads (FUSIONRUN_STORE_MEMO, on by default): a `RunMemo` per run (uid) remembers, for the spec it
was read under (a digest of the effective spec), each task's completion verdict together with the state of
the task's Jobs when it was read (`job_signatures`), and keeps the opened store. A verdict is read again
only when the task's Jobs change (a Job of it appears, finishes, fails or vanishes: its outputs or its
manifest may have changed), together with its inputs' and its dependants' verdicts, or when restartFrom
drops it (`RunMemo.forget`). Training progress is read while a training Job runs and once after; metrics
and alignment diagnostics once. So a pass in which no Job changed reads nothing (the per-pass ReadCache and
the memo both count their requests through `count`: fusionrun_store_requests_total). What changes in the
store behind the operator's back (a task run by hand) is seen when its Jobs change or the operator restarts.

The shared cache (jobs.cache, "extract once, fuse many"; `read_shared`): for each task of a cacheable stage
that is ready (its inputs complete) and has no Job yet, its content key, made with the identities Jobs
recorded in the cache area (`Identities.recorded`: the operator never sees model files), and whether a
complete entry of it exists (`read_entry`) or a live lease says another run's task is making it
(`lease_holder`); plus its claim, the key by spec-level references (`Identities.by_reference`), by which
the runtime's claims (claims.py) let one run of this operator make an output the others wait for. An
identity not recorded yet, or an input not readable, gives no key (no memoization: the Job runs and adopts
inside if an entry appears). A miss nobody makes is remembered like a verdict (read again when the task's
or its inputs' Jobs change, or when `recheck` says its claim was taken or released since); a hit or a
producer is read every pass until adopted or made. For complete tasks, the entry their manifest points at
when another task made it (`SharedOutput.hit`, for status: Memoized), read with the verdict. `adopt` is the
write a pass makes for a memoized task (jobs.complete.adopt).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

from fusionrun_operator.config import pass_settings
from fusionrun_operator.effects import Adoption
from fusionrun_operator.observations import JobObservation, SharedOutput
from fusionrun_operator.pipeline import Pipeline
from jobs.cache import (
    CACHEABLE,
    Identities,
    UnknownIdentity,
    cache_of,
    holder_task,
    lease_holder,
    read_entry,
    release_run,
    task_key,
)
from jobs.complete import ManifestError, completed_tasks, read_manifest, read_outputs, why_incomplete
from jobs.complete import adopt as adopt_entry
from jobs.complete import invalidate as drop_manifest
from jobs.observe import alignment_from_store
from jobs.registry import Layout, Stage
from jobs.settings import Settings
from jobs.spec import FusionRunSpec
from jobs.store import S3Endpoint, S3Store, Store, StoreError, make_s3_client, open_store

Credentials = tuple[str, str]  # (access key id, secret access key)
CredentialsFn = Callable[[], "Credentials | None"]  # read only when the store is S3


class StoreView(NamedTuple):
    store: Store | None
    completed: frozenset[str] | None  # None: the store could not be read
    progress: dict[str, dict[str, Any]]  # train variant -> progress.json
    metrics: dict[str, Any] | None  # evaluate/metrics.json, once evaluate is complete
    alignment: dict[str, Any] | None = None  # per source, once every align task is complete
    shared: Mapping[str, SharedOutput] = MappingProxyType({})  # ready task -> its lookup (read_shared)
    made_from: Mapping[str, SharedOutput] = MappingProxyType({})  # complete task -> the entry's maker


def unread() -> StoreView:
    """The view of a store that was not read: reconcile trusts Job states."""
    return StoreView(None, None, {}, None)


def open_run_store(
    spec: FusionRunSpec, run_name: str, settings: Settings, credentials: CredentialsFn | None = None
) -> Store:
    """The run's store with `settings` (config.store_settings); for S3 a client with the run's keys."""
    client = None
    if spec.store.is_s3:
        keys = credentials() if credentials else None
        client = make_s3_client(S3Endpoint.of(spec.store, settings), credentials=keys)
    return open_store(spec.store, run_name, settings, client=client)


# Store methods -> the request each makes (what fusionrun_store_requests_total counts).
REQUESTS = {
    "size": "head",
    "stat": "head",
    "exists": "head",
    "get_bytes": "get",
    "download": "get",
    "put_bytes": "put",
    "upload": "put",
    "delete": "delete",
    "delete_prefix": "delete",
    "list_stats": "list",
}


class CountingStore:
    """A store whose requests are counted (`count(operation)`); everything else passes through."""

    def __init__(self, store: Any, count: Callable[[str], None]):
        self._store, self._count = store, count

    def sibling(self, name: str) -> CountingStore:
        """The shared cache area (jobs.cache.cache_of), counted too."""
        return CountingStore(self._store.sibling(name), self._count)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name not in REQUESTS or not callable(attr):
            return attr
        op = REQUESTS[name]

        def counted(*args: Any, **kwargs: Any) -> Any:
            self._count(op)
            return attr(*args, **kwargs)

        return counted


Signature = tuple[tuple[str, str, bool], ...]  # a task's Jobs: (name, state, being deleted), sorted


def job_signatures(jobs: Iterable[JobObservation]) -> dict[str, Signature]:
    """The state of each task's Jobs, as the memo compares it between passes."""
    out: dict[str, list[tuple[str, str, bool]]] = {}
    for j in jobs:
        out.setdefault(j.task_id, []).append((j.name, j.state, j.deleting))
    return {task: tuple(sorted(sig)) for task, sig in out.items()}


@dataclass
class RunMemo:
    """What one run's store said, kept between passes (see the module docstring)."""

    spec_digest: str = ""
    store: Any = None  # the opened store (its S3 client and keys)
    keys: Any = field(default=None, repr=False)  # the keys it was opened with (runtime reopens on a change)
    verdicts: dict[str, tuple[Signature, bool]] = field(default_factory=dict)  # task -> (its Jobs, complete)
    sources: dict[str, SharedOutput | None] = field(default_factory=dict)  # complete task -> made from
    lookups: dict[str, tuple[float, SharedOutput]] = field(default_factory=dict)  # task -> (when, a miss)
    progress: dict[str, tuple[Signature, dict[str, Any] | None]] = field(default_factory=dict)  # train task
    metrics: dict[str, Any] | None = None
    alignment: tuple[frozenset[tuple[str, Signature]], dict[str, Any]] | None = None

    def for_spec(self, digest: str) -> RunMemo:
        """Everything is forgotten when the spec changes (verdicts, store settings, keys)."""
        if digest != self.spec_digest:
            self.spec_digest, self.store, self.metrics, self.alignment = digest, None, None, None
            for remembered in (self.verdicts, self.progress, self.sources, self.lookups):
                remembered.clear()
        return self

    def forget(self, task_ids: Iterable[str]) -> None:
        """Read these tasks' verdicts again (their Jobs changed, restartFrom dropped their manifests, a pass
        adopted them)."""
        ids = set(task_ids)
        for t in ids:
            self.verdicts.pop(t, None)
            self.sources.pop(t, None)
            self.lookups.pop(t, None)
        if ids:
            self.metrics, self.alignment = None, None

    def forget_lookups(self, task_ids: Iterable[str]) -> None:
        """Look these tasks up in the shared cache again next pass (they wait for another run)."""
        for t in task_ids:
            self.lookups.pop(t, None)


def spec_digest(pipeline: Pipeline) -> str:
    return hashlib.sha256(pipeline.spec.model_dump_json(by_alias=True).encode()).hexdigest()


class ReadCache:
    """A store seen through a cache of reads for one pass: completed_tasks reads each dependency's
    manifest once per dependant, and S3 GETs are what a pass costs."""

    def __init__(self, store: Any):
        self._store = store
        self._bytes: dict[str, bytes] = {}
        self._sizes: dict[str, int | None] = {}
        self._missing: dict[str, StoreError] = {}  # GETs that failed (an identity not recorded yet, ...)

    def size(self, key: str) -> int | None:
        if key not in self._sizes:
            self._sizes[key] = self._store.size(key)
        return self._sizes[key]

    def exists(self, key: str) -> bool:
        return key in self._bytes or self.size(key) is not None

    def get_bytes(self, key: str) -> bytes:
        if key in self._missing:
            raise self._missing[key]
        if key not in self._bytes:
            try:
                self._bytes[key] = self._store.get_bytes(key)
            except StoreError as err:
                self._missing[key] = err
                raise
        return self._bytes[key]

    def __getattr__(self, name: str) -> Any:  # everything else (uri_for, local_path, ...) as it is
        return getattr(self._store, name)


def read_store_view(
    pipeline: Pipeline,
    run_name: str,
    credentials: CredentialsFn | None = None,
    on_error: Callable[[Exception], None] | None = None,
    memo: RunMemo | None = None,
    signatures: Mapping[str, Signature] | None = None,
    count: Callable[[str], None] | None = None,
    reuse: bool = True,
    recheck: Recheck | None = None,
    settings: Settings | None = None,
) -> StoreView:
    """What the store says for this pass; unread() (after on_error) when it cannot be read: a StoreError, a
    missing Secret, a malformed JSON file. memo: remember between passes (None: read everything, every
    pass); signatures: each task's Jobs now (job_signatures); count: called once per store request;
    reuse: look ready tasks up in the shared cache (read_shared; recheck: see there); settings: how the
    store is opened (config.store_settings; default: pass_settings of jobs.settings' defaults)."""
    sigs = signatures or {}
    try:
        opened = memo is None or memo.store is None
        settings = settings or pass_settings(Settings())
        store = open_run_store(pipeline.spec, run_name, settings, credentials) if opened else memo.store
        if memo is not None:
            memo.store = store
        cached = ReadCache(CountingStore(store, count or (lambda op: None)))
        if memo is None:
            completed = frozenset(completed_tasks(cached, pipeline.spec, pipeline.tasks))
        else:
            completed = memo_completed(cached, pipeline, memo, sigs)
        if opened and not completed and isinstance(store, S3Store):
            (count or (lambda op: None))("head")
            store.check()  # nothing complete: tell "nothing done yet" from "no such bucket" (HEADs say 404)
        progress = read_progress(cached, pipeline, memo, sigs)
        metrics = read_metrics(cached, pipeline, completed, memo)
        alignment = read_alignment(cached, pipeline, completed, memo, sigs)
        ready = Ready(completed, sigs, memo, recheck or (lambda claim, since: False))
        shared, made = read_shared(cached, pipeline, run_name, ready) if reuse else ({}, {})
        return StoreView(store, completed, progress, metrics, alignment, shared, made)
    except Exception as err:
        if memo is not None:
            memo.store = None  # reopened next pass (the Secret's keys may have changed)
        if on_error is not None:
            on_error(err)
        return unread()


def _dependants(tasks: Sequence[Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for t in tasks:
        for d in t.deps:
            out.setdefault(d, []).append(t.id)
    return out


def _stale(pipeline: Pipeline, memo: RunMemo, sigs: Mapping[str, Signature]) -> set[str]:
    """Verdicts to read again: of tasks whose Jobs changed since, their inputs and everything after."""
    dependants = _dependants(pipeline.tasks)
    stale: set[str] = set()
    todo = []
    for t in pipeline.tasks:
        seen = memo.verdicts.get(t.id)
        if seen is not None and seen[0] != sigs.get(t.id, ()):
            stale.update(t.deps)
            todo.append(t.id)
    while todo:
        task_id = todo.pop()
        if task_id not in stale:
            stale.add(task_id)
            todo += dependants.get(task_id, [])
    return stale


def memo_completed(
    cached: ReadCache, pipeline: Pipeline, memo: RunMemo, sigs: Mapping[str, Signature]
) -> frozenset[str]:
    """jobs.complete.completed_tasks with remembered verdicts: only tasks never read, or stale, are read."""
    memo.forget(_stale(pipeline, memo, sigs))
    done: set[str] = set()
    for t in pipeline.tasks:  # topological order
        if not all(d in done for d in t.deps):
            continue
        if t.id not in memo.verdicts:
            complete = why_incomplete(cached, pipeline.spec, t, pipeline.by_id) is None
            memo.verdicts[t.id] = (sigs.get(t.id, ()), complete)
        if memo.verdicts[t.id][1]:
            done.add(t.id)
    return frozenset(done)


def read_progress(
    cached: ReadCache, pipeline: Pipeline, memo: RunMemo | None, sigs: Mapping[str, Signature]
) -> dict[str, dict[str, Any]]:
    """progress.json per train variant: read while its Job runs and once after (every pass unmemoized)."""
    out: dict[str, dict[str, Any]] = {}
    for t in pipeline.train_tasks:
        sig = sigs.get(t.id, ())
        seen = memo.progress.get(t.id) if memo is not None else None
        if seen is None or seen[0] != sig or any(state == "Active" for _, state, _ in sig):
            key = Layout.progress(t.variant)
            value = json.loads(cached.get_bytes(key)) if cached.exists(key) else None
            if memo is not None:
                memo.progress[t.id] = (sig, value)
        else:
            value = seen[1]
        if value is not None:
            out[t.variant or "fused"] = value
    return out


def read_metrics(
    cached: ReadCache, pipeline: Pipeline, completed: frozenset[str], memo: RunMemo | None
) -> dict[str, Any] | None:
    if not pipeline.any_done(Stage.evaluate, completed):
        return None
    if memo is not None and memo.metrics is not None:
        return memo.metrics
    metrics = json.loads(cached.get_bytes(Layout.METRICS)) if cached.exists(Layout.METRICS) else None
    if memo is not None:
        memo.metrics = metrics
    return metrics


def read_alignment(
    cached: ReadCache,
    pipeline: Pipeline,
    completed: frozenset[str],
    memo: RunMemo | None,
    sigs: Mapping[str, Signature],
) -> dict[str, Any] | None:
    """Per source, once every align task is complete (jobs.observe.alignment_from_store)."""
    aligns = frozenset((t.id, sigs.get(t.id, ())) for t in pipeline.tasks if t.stage is Stage.align)
    if memo is not None and memo.alignment is not None and memo.alignment[0] == aligns:
        return memo.alignment[1] or None
    if not aligns or any(task_id not in completed for task_id, _ in aligns):
        return None
    alignment = alignment_from_store(cached, list(pipeline.tasks), completed)
    if memo is not None:
        memo.alignment = (aligns, alignment)
    return alignment or None


# --------------------------------------------------------------------------------------------------
# The shared cache (see the module docstring)

# (claim, when a miss of it was remembered) -> look again: another run claimed it now, or released it since
Recheck = Callable[[str, float], bool]


class Ready(NamedTuple):
    """What read_shared needs of the pass besides the stores."""

    completed: frozenset[str]
    sigs: Mapping[str, Signature]
    memo: RunMemo | None
    recheck: Recheck


def read_shared(
    cached: ReadCache, pipeline: Pipeline, run_name: str, ready: Ready
) -> tuple[dict[str, SharedOutput], dict[str, SharedOutput]]:
    """The shared cache's word on the run's cacheable tasks: (lookups of the ready ones that have no Job
    yet; the entries complete ones were made from, when another task made them)."""
    area = ReadCache(cache_of(cached))  # counted like the run's own store, read once per pass
    shared: dict[str, SharedOutput] = {}
    made: dict[str, SharedOutput] = {}
    for t in pipeline.tasks:
        if t.stage not in CACHEABLE:
            continue
        if t.id in ready.completed:
            found, into = made_from(cached, t, ready.memo), made
        elif not ready.sigs.get(t.id) and all(d in ready.completed for d in t.deps):
            found, into = lookup(cached, area, pipeline, t, run_name, ready), shared
        else:
            continue
        if found is not None:
            into[t.id] = found
    return shared, made


def made_from(cached: ReadCache, task: Any, memo: RunMemo | None) -> SharedOutput | None:
    """The entry a complete task's manifest points at, when another task made it (read with the verdict:
    the manifest is in the pass's cache then; remembered after)."""
    if memo is not None and task.id in memo.sources:
        return memo.sources[task.id]
    m = read_manifest(cached, task) or {}
    made = (m.get("summary") or {}).get("reused_from") or {}
    found = None
    if m.get("entry") and isinstance(made, dict) and made.get("run"):
        key = str(m.get("cache_key") or "")
        found = SharedOutput(str(m["entry"]), key, True, made["run"], made.get("task"))
    if memo is not None:
        memo.sources[task.id] = found
    return found


def lookup(
    cached: ReadCache, area: ReadCache, pipeline: Pipeline, task: Any, run_name: str, ready: Ready
) -> SharedOutput | None:
    """A ready task's key, claim and entry (or producer); None when its inputs or the cache area cannot be
    read (no memoization: its Job runs; the pass's view of the run itself stands)."""
    memo = ready.memo
    seen = memo.lookups.get(task.id) if memo is not None else None
    if seen is not None and not ready.recheck(seen[1].claim, seen[0]):
        return seen[1]
    try:
        inputs = read_outputs(cached, task, pipeline.by_id) if task.deps else {}
        reference = task_key(pipeline.spec, task, Identities.by_reference(), inputs)
        claim = f"{area.base_uri.rstrip('/')}#{reference}"
        try:
            key: str | None = task_key(pipeline.spec, task, Identities.recorded(area), inputs)
        except UnknownIdentity:
            key = None
        found = entry_or_producer(area, task, key, claim, run_name)
    except (ManifestError, KeyError, StoreError):
        return None
    if memo is not None and not (found.hit or found.producer):
        memo.lookups[task.id] = (time.time(), found)
    return found


def entry_or_producer(area: ReadCache, task: Any, key: str | None, claim: str, run_name: str) -> SharedOutput:
    """The complete entry of `key`, else the task of another run that holds its lease, else a miss."""
    if key is None:
        return SharedOutput(claim)
    entry = read_entry(area, task.stage, key)
    if entry is not None:
        made = entry.record.get("created_by") or {}
        return SharedOutput(claim, key, True, made.get("run"), made.get("task"))
    holder = lease_holder(area, task.stage, key)
    run, other = holder_task(holder) if holder else ("", "")
    if holder and run != run_name:  # this run's own lease is a Job of it that is gone (it has none now)
        return SharedOutput(claim, key, producer=f"run {run or '?'} (task {other or '?'})")
    return SharedOutput(claim, key)


def adopt(store: Store, pipeline: Pipeline, run_name: str, adoptions: Iterable[Adoption]) -> list[str]:
    """Make the tasks complete from the shared cache (jobs.complete.adopt: the run's manifest points at the
    entry, and the run is recorded as its user). Returns the tasks whose entry was not there (gone, or
    found corrupt and dropped): they are looked up again next pass."""
    missed = []
    for a in adoptions:
        task = pipeline.by_id[a.task_id]
        if adopt_entry(store, pipeline.spec, task, pipeline.by_id, run_name, a.key) is None:
            missed.append(a.task_id)
    return missed


def delete_artifacts(store: Store, run_name: str) -> tuple[int, list[str]]:
    """spec.deleteArtifacts: first let go of the shared cache entries the run used (jobs.cache.release_run:
    its user records go, and so do the entries no other live run points at), then delete everything under
    the run's prefix. Returns (objects deleted, entries deleted)."""
    released = release_run(store, run_name)  # before the prefix: its manifests say which entries it used
    return store.delete_prefix(""), released


def invalidate(store: Store, pipeline: Pipeline, task_ids: Iterable[str]) -> None:
    """Drop the tasks' manifests (restartFrom): the next passes see them incomplete and rerun them."""
    for task_id in task_ids:
        drop_manifest(store, pipeline.by_id[task_id])
