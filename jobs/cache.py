"""Extract once, fuse many: the outputs of prepare, extract and align, shared across runs by content.

Running source models over the corpus is the costly part of fusion. A task of a cacheable stage is
identified by what decides its outputs, not by the run's name:

  prepare   the corpus (its stamp: paths/keys, sizes, mtimes/ETags), the corpus settings, maxLength, the
            number of shards, and the identity of every tokenizer of the run (documents are cut to fit all)
  extract   the model's identity (a stamp of its weights and tokenizer files, or its S3 objects' ETags; a
            hub id and revision; randomInit's shape), the prepared documents' sha256, topK and numerics
  align     the sha256 of both extractions and of the documents, both tokenizers' identities, alignment

(the model names and the run's name are not part of it). Outputs live once in the store's shared area,
`<store uri>/_cache/<stage>/<kk>/<key>/` (files, then `entry.json` last), and a run's task manifest points
at its entry (`"entry"`). A second run whose task has the same key adopts the entry: it writes its own
manifest, runs nothing. Entries record their users (`users/<run>`), so `fusionrun cache ls/prune` and a
run's deletion know what is still in use.

One writer: a task that finds no entry takes the entry's lease (`lease.json`, an atomic create-if-absent:
a conditional PUT on S3, a hard link locally) and renews it while it works; a concurrent task with the same
key waits for the entry and adopts it; a lease not renewed for FUSIONRUN_CACHE_LEASE_SECONDS (default 600)
is taken over (its writer died). A partial entry has no entry.json and is never adopted.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jobs.registry import Stage, Task
from jobs.store import Store, StoreError

if TYPE_CHECKING:
    from jobs.spec import FusionRunSpec, ModelRef

CACHE_AREA = "_cache"  # beside the runs' prefixes; not a valid run name (DNS label), so never a run's
CACHE_VERSION = 1  # bump when a cacheable stage's outputs change for the same inputs
CACHEABLE = frozenset({Stage.prepare, Stage.extract, Stage.align})
ENTRY, LEASE, USERS = "entry.json", "lease.json", "users"


def enabled(task: Task) -> bool:
    """Whether a task's outputs go to the shared cache: cacheable stages, unless turned off
    (FUSIONRUN_CACHE=off: each run keeps its own outputs, as before the cache existed)."""
    return task.stage in CACHEABLE and os.environ.get("FUSIONRUN_CACHE", "on") != "off"


def lease_seconds() -> float:
    return float(os.environ.get("FUSIONRUN_CACHE_LEASE_SECONDS", "600"))


def poll_seconds() -> float:
    return float(os.environ.get("FUSIONRUN_CACHE_POLL_SECONDS", "5"))


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def cache_of(store: Store) -> Store:
    """The shared cache area of the store a run's store belongs to."""
    return store.sibling(CACHE_AREA)


# --------------------------------------------------------------------------------------------------
# Identities (what a model or a tokenizer is, by content stamps)


def tokenizer_identity(ref: ModelRef, where: Any) -> str:
    """The tokenizer a model uses, by content: the stamp of its files (jobs.locations.stamp)."""
    from jobs.locations import stamp

    uri = ref.tokenizer_uri
    if _is_hub(uri):
        return _sha({"hub": uri, "revision": ref.revision})
    gguf = ref.gguf_file if ref.tokenizer is None else None  # a GGUF's tokenizer is inside the file
    target = f"{uri.rstrip('/')}/{gguf}" if gguf else uri
    return _sha({"files": stamp(target, where), "ggufFile": gguf, "addBos": ref.add_bos})


def model_identity(ref: ModelRef, where: Any) -> str:
    """A model by content: randomInit's shape and seed, or the stamp of its weights (the GGUF file, the
    folder's files, the S3 objects' ETags), or a hub id and revision; plus its tokenizer's identity."""
    from jobs.locations import stamp

    tok = tokenizer_identity(ref, where)
    if ref.random_init is not None:
        return _sha({"randomInit": ref.random_init.model_dump(mode="json"), "tokenizer": tok})
    assert ref.uri is not None
    if _is_hub(ref.uri):
        return _sha({"hub": ref.uri, "revision": ref.revision, "tokenizer": tok})
    weights = f"{ref.uri.rstrip('/')}/{ref.gguf_file}" if ref.gguf_file else ref.uri
    return _sha({"weights": stamp(weights, where), "ggufFile": ref.gguf_file, "tokenizer": tok})


def _is_hub(uri: str) -> bool:
    from fusion.paths import hub_id

    return hub_id(uri) is not None


# --------------------------------------------------------------------------------------------------
# Keys


def task_key(spec: FusionRunSpec, task: Task, where: Any, inputs: Mapping[str, str]) -> str:
    """The content key of a cacheable task. `inputs`: sha256 of each output of its dependencies that it
    reads (the documents for extract; both extractions and the documents for align), by logical key."""
    d = spec.model_dump(mode="json", by_alias=True)
    if task.stage is Stage.prepare:
        corpus = {k: v for k, v in d["corpus"].items() if k != "uri"}
        from jobs.corpus import corpus_stamp

        what: dict[str, Any] = {
            "corpus": corpus,
            "stamp": corpus_stamp(spec.corpus, where),
            "maxLength": d["extraction"]["maxLength"],
            "shards": d["extraction"]["shards"],
            "tokenizers": sorted(tokenizer_identity(m, where) for m in spec.models),
        }
    elif task.stage is Stage.extract:
        ext = d["extraction"]
        what = {
            "model": model_identity(spec.model(task.model or ""), where),
            "numerics": {k: ext[k] for k in ("topK", "maxLength", "dtype", "device")},
        }
    elif task.stage is Stage.align:
        what = {
            "source": tokenizer_identity(spec.model(task.model or ""), where),
            "target": tokenizer_identity(spec.target, where),
            "alignment": d["alignment"],
        }
    else:
        raise ValueError(f"stage {task.stage.value} is not cached")
    return _sha({"stage": task.stage.value, "what": what, "inputs": dict(inputs), "v": CACHE_VERSION})


def entry_prefix(stage: Stage, key: str) -> str:
    return f"{stage.value}/{key[:2]}/{key}"


# --------------------------------------------------------------------------------------------------
# Entries


@dataclass(frozen=True)
class Entry:
    stage: Stage
    key: str
    record: dict[str, Any]  # entry.json: {key, stage, outputs: {basename: {sha256, bytes}}, created_*}

    @property
    def prefix(self) -> str:
        return entry_prefix(self.stage, self.key)

    def file(self, name: str) -> str:
        return f"{self.prefix}/{name}"


def read_entry(cache: Store, stage: Stage, key: str) -> Entry | None:
    """The complete entry of `key` (its entry.json readable and every file there with its size), or None."""
    prefix = entry_prefix(stage, key)
    try:
        raw = cache.get_bytes(f"{prefix}/{ENTRY}") if cache.exists(f"{prefix}/{ENTRY}") else None
        record = json.loads(raw) if raw else None
    except (StoreError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("outputs"), dict):
        return None
    for name, o in record["outputs"].items():
        if cache.size(f"{prefix}/{name}") != o.get("bytes"):
            return None
    return Entry(stage, key, record)


def publish(
    cache: Store,
    stage: Stage,
    key: str,
    outputs: Mapping[str, Any],
    made: Mapping[str, Any],
) -> Entry:
    """Write entry.json LAST, once every file is in place: from then on the entry can be adopted.
    `outputs`: basename -> Output; `made`: what adopters copy into their manifests (counts, summary, the
    run and task that made it)."""
    record = {
        "key": key,
        "stage": stage.value,
        "version": CACHE_VERSION,
        "outputs": {n: {"sha256": o.sha256, "bytes": o.bytes} for n, o in sorted(outputs.items())},
        **made,
        "created_at": time.time(),
    }
    cache.put_bytes(
        f"{entry_prefix(stage, key)}/{ENTRY}", json.dumps(record, indent=1, sort_keys=True).encode()
    )
    return Entry(stage, key, record)


def add_user(cache: Store, entry: Entry, run: str, manifest_key: str) -> None:
    """Record that `run` uses the entry through its manifest at `manifest_key` (what `cache ls` shows; a
    run's deletion and `cache prune` check that manifest before deleting an entry)."""
    doc = {"run": run, "manifest": manifest_key, "at": time.time()}
    cache.put_bytes(f"{entry.prefix}/{USERS}/{run}", json.dumps(doc).encode())


def drop_entry(cache: Store, stage: Stage, key: str) -> None:
    """Make an entry unusable (a corrupt file found by a reader): entry.json first, then the rest."""
    prefix = entry_prefix(stage, key)
    cache.delete(f"{prefix}/{ENTRY}")
    cache.delete_prefix(f"{prefix}/")


# --------------------------------------------------------------------------------------------------
# The one-writer lease


def holder_id(run: str, task_id: str) -> str:
    return f"{run}/{task_id}@{socket.gethostname()}:{os.getpid()}"


def _lease_doc(holder: str) -> bytes:
    return json.dumps({"holder": holder, "expires_at": time.time() + lease_seconds()}).encode()


def try_lease(cache: Store, stage: Stage, key: str, holder: str) -> str | None:
    """Take the entry's lease: None when taken (by this call, or a takeover of an expired one), else the
    live holder's id."""
    lease = f"{entry_prefix(stage, key)}/{LEASE}"
    if cache.create(lease, _lease_doc(holder)):
        return None
    try:
        doc = json.loads(cache.get_bytes(lease))
    except (StoreError, ValueError):
        doc = {}
    holder_now = str(doc.get("holder", "another task"))
    if float(doc.get("expires_at", 0)) > time.time() and not _dead_here(holder_now):
        return holder_now
    cache.delete(lease)  # expired, or its writer died on this machine: whoever creates it next holds it
    return None if cache.create(lease, _lease_doc(holder)) else "another task"


def _dead_here(holder: str) -> bool:
    """A holder that was a process on this machine which no longer exists (killed before it could
    release): no need to wait for its lease to expire. Holders elsewhere are judged by expiry alone."""
    host, _, pid = holder.rpartition("@")[2].rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@contextmanager
def held_lease(cache: Store, stage: Stage, key: str, holder: str) -> Iterator[None]:
    """Renew the (already taken) lease in the background while the block runs; release it after."""
    lease = f"{entry_prefix(stage, key)}/{LEASE}"
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lease_seconds() / 3):
            # A store hiccup: the next renewal tries again well before the lease expires.
            with suppress(StoreError):
                cache.put_bytes(lease, _lease_doc(holder))

    thread = threading.Thread(target=renew, name="cache-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        with suppress(StoreError):  # else it expires on its own
            cache.delete(lease)


def entry_file(stage: Stage, logical_key: str) -> str:
    """The file name in an entry of a task's output. Per-shard stages have one output, named the same
    whatever the run calls its model or shard; prepare's keys name no model (Layout.documents, HELDOUT)."""
    return logical_key.rsplit("/", 1)[-1] if stage is Stage.prepare else "shard.safetensors"


def logical_key(stage: Stage, name: str, task: Task) -> str:
    """The inverse of entry_file for one run's task."""
    from jobs.registry import Layout

    return f"{Stage.prepare.value}/{name}" if stage is Stage.prepare else Layout.shard(task)


def located(store: Store, manifest: Mapping[str, Any] | None, key: str) -> tuple[Store, str]:
    """Where the bytes of a task's output `key` (its logical key, jobs.registry.Layout) are: in the shared
    cache when the task's manifest points at an entry, else in the run's own store."""
    entry = (manifest or {}).get("entry")
    if not entry:
        return store, key
    return cache_of(store), f"{entry}/{entry_file(Stage(manifest['stage']), key)}"
