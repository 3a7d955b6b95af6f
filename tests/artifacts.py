"""Where a task's output file is in a local store: the run's own folder, or the shared cache entry its
manifest points at (jobs.cache). Tests look at bytes through this, whatever the layout."""

from __future__ import annotations

from pathlib import Path

from jobs.cache import located
from jobs.complete import read_manifest
from jobs.registry import Layout, Stage, Task
from jobs.store import LocalStore, Store


def output_file(store_root: Path, run: str, task: Task, key: str | None = None) -> Path:
    store = LocalStore(Path(store_root) / run)
    logical = key or (Layout.HELDOUT if task.stage is Stage.prepare else Layout.shard(task))
    where, physical = located(store, read_manifest(store, task), logical)
    path = where.local_path(physical)
    assert path is not None
    return path


def read_output(store: Store, task: Task, key: str, dest: Path) -> Path:
    """Download a task's output `key` (any store) to `dest`, wherever its bytes are."""
    where, physical = located(store, read_manifest(store, task), key)
    return where.download(physical, dest)
