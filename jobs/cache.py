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
key waits for the entry and adopts it; a lease not renewed for the settings' cache_lease_seconds
(FUSIONRUN_CACHE_LEASE_SECONDS, 600) is taken over (its writer died). A partial entry has no entry.json
and is never adopted.
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

from fusion.paths import hub_id
from jobs.corpus import corpus_stamp
from jobs.locations import stamp
from jobs.registry import STAGES, CacheLayout, Stage, Task
from jobs.settings import Settings
from jobs.store import Store, StoreError, endpoint_of

if TYPE_CHECKING:
    from jobs.spec import FusionRunSpec, ModelRef

CACHE_VERSION = 1  # bump when a cacheable stage's outputs change for the same inputs
CACHEABLE = frozenset(s for s, d in STAGES.items() if d.cacheable)
ENTRY, USERS = CacheLayout.ENTRY, CacheLayout.USERS


def enabled(task: Task, settings: Settings) -> bool:
    """Whether a task's outputs go to the shared cache: cacheable stages, unless turned off (settings.reuse,
    FUSIONRUN_REUSE=off: each run keeps its own outputs, as before the cache existed)."""
    return task.stage in CACHEABLE and settings.reuse


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def cache_of(store: Store) -> Store:
    """The shared cache area of the store a run's store belongs to."""
    return store.sibling(CacheLayout.AREA)


# --------------------------------------------------------------------------------------------------
# Identities (what a model, a tokenizer or the corpus is, by content stamps)


class UnknownIdentity(LookupError):
    """An identity that cannot be had here (the operator, before any Job recorded it): no memoization."""


class Identities:
    """The content identities a cache key is made of, computed where the files are visible (a stage, the
    local runner: `Identities.live`) and recorded in the cache area, so that where they are not (the
    operator) the recorded ones stand in (`Identities.recorded`)."""

    def __init__(self, where: Any, cache: Store | None, live: bool, references: bool = False):
        self.where, self.cache, self.live, self.references = where, cache, live, references

    @classmethod
    def live_for(cls, store: Store, spec: FusionRunSpec) -> Identities:
        return cls(endpoint_of(store, spec.store), cache_of(store), live=True)

    @classmethod
    def recorded(cls, cache: Store) -> Identities:
        return cls(None, cache, live=False)

    @classmethod
    def by_reference(cls) -> Identities:
        """Stand-ins, no I/O: each identity is its spec-level reference. A key made with them names no
        entry; it tells the operator that two runs are about to make the same output (equal references,
        equal inputs) before any Job has recorded what the references are."""
        return cls(None, None, live=False, references=True)

    def _get(self, kind: str, ref: Mapping[str, Any], compute: Any) -> str:
        """A live identity (recorded for the operator), or the recorded one of this spec-level ref."""
        if self.references:
            return f"ref:{_sha({'kind': kind, 'ref': ref})}"
        record = CacheLayout.identity(kind, _sha(ref))
        if self.live:
            value = compute()
            if self.cache is not None:
                with suppress(StoreError):
                    prev = _json(self.cache, record) or {}
                    if prev.get("identity") != value:
                        self.cache.put_bytes(record, json.dumps({"identity": value, "ref": ref}).encode())
            return value
        doc = _json(self.cache, record) if self.cache is not None else None
        if not isinstance(doc, dict) or "identity" not in doc:
            raise UnknownIdentity(f"no recorded {kind} identity for {ref}")
        return str(doc["identity"])

    def tokenizer(self, ref: ModelRef) -> str:
        fields = ref.model_dump(mode="json", include={"uri", "tokenizer", "gguf_file", "revision", "add_bos"})
        return self._get("tokenizer", fields, lambda: tokenizer_identity(ref, self.where))

    def model(self, ref: ModelRef) -> str:
        fields = ref.model_dump(mode="json", exclude={"name"})
        return self._get("model", fields, lambda: model_identity(ref, self.where))

    def corpus(self, corpus: Any) -> str | None:
        fields = corpus.model_dump(mode="json")
        return self._get("corpus", fields, lambda: corpus_stamp(corpus, self.where))


def tokenizer_identity(ref: ModelRef, where: Any) -> str:
    """The tokenizer a model uses, by content: the stamp of its files (jobs.locations.stamp)."""
    uri = ref.tokenizer_uri
    if _is_hub(uri):
        return _sha({"hub": uri, "revision": ref.revision})
    gguf = ref.gguf_file if ref.tokenizer is None else None  # a GGUF's tokenizer is inside the file
    target = f"{uri.rstrip('/')}/{gguf}" if gguf else uri
    return _sha({"files": stamp(target, where), "ggufFile": gguf, "addBos": ref.add_bos})


def model_identity(ref: ModelRef, where: Any) -> str:
    """A model by content: randomInit's shape and seed, or the stamp of its weights (the GGUF file, the
    folder's files, the S3 objects' ETags), or a hub id and revision; plus its tokenizer's identity."""
    tok = tokenizer_identity(ref, where)
    if ref.random_init is not None:
        return _sha({"randomInit": ref.random_init.model_dump(mode="json"), "tokenizer": tok})
    assert ref.uri is not None
    if _is_hub(ref.uri):
        return _sha({"hub": ref.uri, "revision": ref.revision, "tokenizer": tok})
    weights = f"{ref.uri.rstrip('/')}/{ref.gguf_file}" if ref.gguf_file else ref.uri
    return _sha({"weights": stamp(weights, where), "ggufFile": ref.gguf_file, "tokenizer": tok})


def _is_hub(uri: str) -> bool:
    return hub_id(uri) is not None


# --------------------------------------------------------------------------------------------------
# Keys


def task_key(spec: FusionRunSpec, task: Task, ids: Identities, inputs: Mapping[str, str]) -> str:
    """The content key of a cacheable task. `inputs`: sha256 of each output of its dependencies that it
    reads (the documents for extract; both extractions and the documents for align), by logical key.
    Raises UnknownIdentity when `ids` cannot tell an identity."""
    d = spec.model_dump(mode="json", by_alias=True)
    if task.stage is Stage.prepare:
        what: dict[str, Any] = {
            "corpus": {k: v for k, v in d["corpus"].items() if k != "uri"},
            "stamp": ids.corpus(spec.corpus),
            "maxLength": d["extraction"]["maxLength"],
            "shards": d["extraction"]["shards"],
            "tokenizers": sorted(ids.tokenizer(m) for m in spec.models),
        }
    elif task.stage is Stage.extract:
        ext = d["extraction"]
        what = {
            "model": ids.model(spec.model(task.model or "")),
            "numerics": {k: ext[k] for k in ("topK", "maxLength", "dtype", "device")},
        }
    elif task.stage is Stage.align:
        what = {
            "source": ids.tokenizer(spec.model(task.model or "")),
            "target": ids.tokenizer(spec.target),
            "alignment": d["alignment"],
        }
    else:
        raise ValueError(f"stage {task.stage.value} is not cached")
    return _sha({"stage": task.stage.value, "what": what, "inputs": dict(inputs), "v": CACHE_VERSION})


# --------------------------------------------------------------------------------------------------
# Entries


@dataclass(frozen=True)
class Entry:
    stage: Stage
    key: str
    record: dict[str, Any]  # entry.json: {key, stage, outputs: {basename: {sha256, bytes}}, created_*}

    @property
    def prefix(self) -> str:
        return CacheLayout.entry(self.stage, self.key)

    def file(self, name: str) -> str:
        return CacheLayout.at(self.prefix, name)


def read_entry(cache: Store, stage: Stage, key: str) -> Entry | None:
    """The complete entry of `key` (its entry.json readable and every file there with its size), or None."""
    prefix = CacheLayout.entry(stage, key)
    record_key = CacheLayout.at(prefix, ENTRY)
    try:
        raw = cache.get_bytes(record_key) if cache.exists(record_key) else None
        record = json.loads(raw) if raw else None
    except (StoreError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("outputs"), dict):
        return None
    for name, o in record["outputs"].items():
        if cache.size(CacheLayout.at(prefix, name)) != o.get("bytes"):
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
    entry = Entry(stage, key, record)
    cache.put_bytes(entry.file(ENTRY), json.dumps(record, indent=1, sort_keys=True).encode())
    return entry


def add_user(cache: Store, entry: Entry, run: str, manifest_key: str) -> None:
    """Record that `run` uses the entry through its manifest at `manifest_key` (what `cache ls` shows; a
    run's deletion and `cache prune` check that manifest before deleting an entry)."""
    doc = {"run": run, "manifest": manifest_key, "at": time.time()}
    cache.put_bytes(CacheLayout.user(entry.prefix, run), json.dumps(doc).encode())


def drop_entry(cache: Store, stage: Stage, key: str) -> None:
    """Make an entry unusable (a corrupt file found by a reader): entry.json first, then the rest."""
    _delete_entry(cache, CacheLayout.entry(stage, key))


def _delete_entry(cache: Store, prefix: str) -> None:
    """entry.json first (a half-deleted entry is never adopted), then the rest."""
    cache.delete(CacheLayout.at(prefix, ENTRY))
    cache.delete_prefix(f"{prefix}/")


# --------------------------------------------------------------------------------------------------
# The one-writer lease


def holder_id(run: str, task_id: str) -> str:
    return f"{run}/{task_id}@{socket.gethostname()}:{os.getpid()}"


def _lease_doc(cache: Store, holder: str) -> bytes:
    """A lease for the store's settings' cache_lease_seconds from now."""
    return json.dumps(
        {"holder": holder, "expires_at": time.time() + cache.settings.cache_lease_seconds}
    ).encode()


def _lease(stage: Stage, key: str) -> str:
    return CacheLayout.at(CacheLayout.entry(stage, key), CacheLayout.LEASE)


def try_lease(cache: Store, stage: Stage, key: str, holder: str) -> str | None:
    """Take the entry's lease: None when taken (by this call, or a takeover of an expired one), else the
    live holder's id."""
    lease = _lease(stage, key)
    if cache.create(lease, _lease_doc(cache, holder)):
        return None
    try:
        doc = json.loads(cache.get_bytes(lease))
    except (StoreError, ValueError):
        doc = {}
    holder_now = str(doc.get("holder", "another task"))
    if float(doc.get("expires_at", 0)) > time.time() and not _dead_here(holder_now):
        return holder_now
    cache.delete(lease)  # expired, or its writer died on this machine: whoever creates it next holds it
    return None if cache.create(lease, _lease_doc(cache, holder)) else "another task"


def lease_holder(cache: Store, stage: Stage, key: str) -> str | None:
    """Who holds the entry's lease now (a task making it), or None: no lease, an expired one, or one whose
    writer died on this machine. Reads only (the operator's view; try_lease takes it)."""
    doc = _json(cache, _lease(stage, key))
    if not isinstance(doc, dict):
        return None
    holder = str(doc.get("holder", "another task"))
    alive = float(doc.get("expires_at", 0)) > time.time() and not _dead_here(holder)
    return holder if alive else None


def holder_task(holder: str) -> tuple[str, str]:
    """(run, task id) of a lease holder's id (holder_id)."""
    run, _, task = holder.rpartition("@")[0].partition("/")
    return run, task


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
    lease = _lease(stage, key)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(cache.settings.cache_lease_seconds / 3):
            # A store hiccup: the next renewal tries again well before the lease expires.
            with suppress(StoreError):
                cache.put_bytes(lease, _lease_doc(cache, holder))

    thread = threading.Thread(target=renew, name="cache-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        with suppress(StoreError):  # else it expires on its own
            cache.delete(lease)


def located(store: Store, manifest: Mapping[str, Any] | None, key: str) -> tuple[Store, str]:
    """Where the bytes of a task's output `key` (its logical key, jobs.registry.Layout) are: in the shared
    cache when the task's manifest points at an entry, else in the run's own store."""
    entry = (manifest or {}).get("entry")
    if not entry:
        return store, key
    return cache_of(store), CacheLayout.at(entry, CacheLayout.file(Stage(manifest["stage"]), key))


# --------------------------------------------------------------------------------------------------
# Management: what is cached, who uses it, what can go (`fusionrun cache ls/prune`, run deletion)


@dataclass
class EntryInfo:
    prefix: str  # <stage>/<kk>/<key>
    complete: bool  # entry.json present (a partial entry has none: a writer died or is still writing)
    bytes: int
    created_by: dict[str, Any]
    created_at: float | None
    last_used: float | None  # the newest of its creation and its users' adoptions
    users: dict[str, str]  # run -> manifest key that points at it (as recorded)


def list_entries(cache: Store) -> list[EntryInfo]:
    """Every entry of the cache area, complete or not, from one listing (plus each entry's records)."""
    groups: dict[str, list[str]] = {}
    for key in cache.list(""):
        parts = key.split("/")
        if len(parts) >= 4:  # <stage>/<kk>/<key>/<file> (CacheLayout.entry); not identities/<kind>/<ref>
            groups.setdefault("/".join(parts[:3]), []).append("/".join(parts[3:]))
    return [_info(cache, prefix, names) for prefix, names in sorted(groups.items())]


def _info(cache: Store, prefix: str, names: list[str]) -> EntryInfo:
    record = _json(cache, CacheLayout.at(prefix, ENTRY)) if ENTRY in names else None
    users = {}
    times = [record.get("created_at")] if record else []
    for name in names:
        if name.startswith(f"{USERS}/"):
            doc = _json(cache, CacheLayout.at(prefix, name)) or {}
            users[name.split("/", 1)[1]] = str(doc.get("manifest", ""))
            times.append(doc.get("at"))
    size = sum(cache.size(CacheLayout.at(prefix, n)) or 0 for n in names if not n.startswith(f"{USERS}/"))
    stamps = [float(t) for t in times if isinstance(t, int | float)]
    return EntryInfo(
        prefix=prefix,
        complete=record is not None,
        bytes=size,
        created_by=(record or {}).get("created_by", {}),
        created_at=(record or {}).get("created_at"),
        last_used=max(stamps) if stamps else None,
        users=users,
    )


def _json(store: Store, key: str) -> Any:
    try:
        return json.loads(store.get_bytes(key))
    except (StoreError, ValueError):
        return None


def live_users(cache: Store, info: EntryInfo) -> list[str]:
    """The runs whose manifest (as their user record says) still points at the entry: what never goes."""
    live = []
    for run, manifest_key in info.users.items():
        manifest = _json(cache.sibling(run), manifest_key) if manifest_key else None
        if isinstance(manifest, dict) and manifest.get("entry") == info.prefix:
            live.append(run)
    return sorted(live)


def prunable(info: EntryInfo, live: list[str], now: float, older_than: float | None, keep_used: bool) -> bool:
    """Whether `cache prune` removes an entry: never one a live run points at; with --keep-used every other
    one; with --older-than only those whose last use (or, for a partial entry, start) is that old."""
    if live:
        return False
    if keep_used:
        return True
    last = info.last_used if info.last_used is not None else 0.0
    return older_than is not None and now - last > older_than


def prune(
    cache: Store, older_than: float | None, keep_used: bool, dry_run: bool = False, now: float | None = None
) -> list[EntryInfo]:
    """Remove the entries no live run uses (see prunable); returns them."""
    now = time.time() if now is None else now
    gone = []
    for info in list_entries(cache):
        if prunable(info, live_users(cache, info), now, older_than, keep_used):
            gone.append(info)
            if not dry_run:
                _delete_entry(cache, info.prefix)
    return gone


def release_run(run_store: Store, run: str) -> list[str]:
    """Before a run's own artifacts are deleted: drop its user records, and delete the entries it used that
    no other live run points at. Returns the entries deleted."""
    cache = cache_of(run_store)
    deleted = []
    prefixes = {
        m["entry"]
        for k in run_store.list("")
        if k.endswith("manifest.json")
        and isinstance(m := _json(run_store, k), dict)
        and isinstance(m.get("entry"), str)
    }
    for prefix in sorted(prefixes):
        cache.delete(CacheLayout.user(prefix, run))
        info = _info(cache, prefix, [k[len(prefix) + 1 :] for k in cache.list(f"{prefix}/")])
        if not [u for u in live_users(cache, info) if u != run]:
            _delete_entry(cache, prefix)
            deleted.append(prefix)
    return deleted
