"""A run's store as one reconcile pass sees it: completed tasks, training progress, evaluate metrics, read
once before reconcile through a per-pass read cache; plus the one write a pass makes (restartFrom drops
manifests). The only operator module that uses jobs.complete (what makes a task complete).

The S3 client comes from jobs.store's factory with the run's keys (read from its Secret by the caller) and
short retries and timeouts: the operator must not hang on a store that is down. Keys stay in memory only:
never logged, never in status or events. An unreadable store is "unknown" (completed=None: reconcile then
trusts Job states), never "nothing done".
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from fusionrun_operator.pipeline import Pipeline
from jobs.registry import Layout
from jobs.spec import FusionRunSpec
from jobs.store import S3Store, Store, make_s3_client, open_store, parse_s3_uri

Credentials = tuple[str, str]  # (access key id, secret access key)
CredentialsFn = Callable[[], "Credentials | None"]  # read only when the store is S3

# The operator's S3 client: two attempts, 3 s to connect, 10 s to read (a pass must not block for long).
S3_ATTEMPTS, S3_CONNECT_TIMEOUT, S3_READ_TIMEOUT = 2, 3.0, 10.0


class StoreView(NamedTuple):
    store: Store | None
    completed: frozenset[str] | None  # None: the store could not be read
    progress: dict[str, dict[str, Any]]  # train variant -> progress.json
    metrics: dict[str, Any] | None  # evaluate/metrics.json, once evaluate is complete
    alignment: dict[str, Any] | None = None  # per source, once every align task is complete


def unread() -> StoreView:
    """The view of a store that was not read: reconcile trusts Job states."""
    return StoreView(None, None, {}, None)


def open_run_store(spec: FusionRunSpec, run_name: str, credentials: CredentialsFn | None = None) -> Store:
    if not spec.store.is_s3:
        return open_store(spec.store, run_name)
    bucket, prefix = parse_s3_uri(spec.store.uri)
    client = make_s3_client(
        spec.store,
        S3_ATTEMPTS,
        credentials=credentials() if credentials else None,
        connect_timeout=S3_CONNECT_TIMEOUT,
        read_timeout=S3_READ_TIMEOUT,
    )
    return S3Store(spec.store, bucket, f"{prefix}/{run_name}" if prefix else run_name, client=client)


class ReadCache:
    """A store seen through a cache of reads for one pass: completed_tasks reads each dependency's
    manifest once per dependant, and S3 GETs are what a pass costs."""

    def __init__(self, store: Any):
        self._store = store
        self._bytes: dict[str, bytes] = {}
        self._sizes: dict[str, int | None] = {}

    def size(self, key: str) -> int | None:
        if key not in self._sizes:
            self._sizes[key] = self._store.size(key)
        return self._sizes[key]

    def exists(self, key: str) -> bool:
        return key in self._bytes or self.size(key) is not None

    def get_bytes(self, key: str) -> bytes:
        if key not in self._bytes:
            self._bytes[key] = self._store.get_bytes(key)
        return self._bytes[key]

    def __getattr__(self, name: str) -> Any:  # everything else (uri_for, local_path, ...) as it is
        return getattr(self._store, name)


def read_store_view(
    pipeline: Pipeline,
    run_name: str,
    credentials: CredentialsFn | None = None,
    on_error: Callable[[Exception], None] | None = None,
) -> StoreView:
    """What the store says for this pass; unread() (after on_error) when it cannot be read: a StoreError, a
    missing Secret, a malformed JSON file."""
    from jobs.complete import completed_tasks
    from jobs.observe import alignment_from_store

    try:
        store = open_run_store(pipeline.spec, run_name, credentials)
        cached = ReadCache(store)
        completed = frozenset(completed_tasks(cached, pipeline.spec, pipeline.tasks))
        if not completed and isinstance(store, S3Store):
            store.check()  # nothing complete: tell "nothing done yet" from "no such bucket" (HEADs say 404)
        progress: dict[str, dict[str, Any]] = {}
        for t in pipeline.train_tasks:
            key = Layout.progress(t.variant)
            if store.exists(key):
                progress[t.variant or "fused"] = json.loads(store.get_bytes(key))
        metrics = None
        if pipeline.any_done("evaluate", completed) and store.exists(Layout.METRICS):
            metrics = json.loads(store.get_bytes(Layout.METRICS))
        alignment = alignment_from_store(cached, list(pipeline.tasks), completed) or None
        return StoreView(store, completed, progress, metrics, alignment)
    except Exception as err:
        if on_error is not None:
            on_error(err)
        return unread()


def invalidate(store: Store, pipeline: Pipeline, task_ids: Iterable[str]) -> None:
    """Drop the tasks' manifests (restartFrom): the next passes see them incomplete and rerun them."""
    from jobs.complete import invalidate as drop_manifest

    for task_id in task_ids:
        drop_manifest(store, pipeline.by_id[task_id])
