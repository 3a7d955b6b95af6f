"""Checkpoint bookkeeping: COMPLETE markers, finding the newest usable checkpoint, upload, download, pruning.

A checkpoint is the folder `step-N` that `engine.save_checkpoint(root, tag="step-N")` writes, plus our own
files (data position, RNG states). It is usable only once its `COMPLETE` marker exists: a JSON manifest of
every file with its size and sha256, written last (locally with an atomic rename, in the store as the last
object uploaded). A folder without its marker is a checkpoint cut short by a crash and is never loaded.

The store is anything with the artifact-store methods used here (jobs.store.Store satisfies it); fusion
does not import jobs. Keys are `<prefix>/step-N/<file>`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from fusion.atomic import write_atomic
from fusion.format import sha256_file

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class ArtifactStore(Protocol):
    def exists(self, key: str) -> bool: ...
    def get_bytes(self, key: str) -> bytes: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def upload(self, local_path: str | os.PathLike, key: str) -> None: ...
    def download(self, key: str, local_path: str | os.PathLike) -> Path: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def delete_prefix(self, prefix: str) -> int: ...


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing files, bad checksum); names the checkpoint and the fix."""


def tag(step: int) -> str:
    return f"step-{step}"


def step_of(name: str) -> int | None:
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


def hash_files(step_dir: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {bytes, sha256}} of every file in a checkpoint folder except the marker."""
    out = {}
    for p in sorted(step_dir.rglob("*")):
        if p.is_file() and p.name != MARKER and not p.name.endswith(".partial"):
            rel = p.relative_to(step_dir).as_posix()
            out[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    return out


def marker_bytes(step: int, files: dict[str, dict[str, Any]], meta: dict[str, Any]) -> bytes:
    return json.dumps({"step": step, "files": files, **meta}, indent=1, sort_keys=True).encode()


def write_local_marker(step_dir: Path, data: bytes) -> None:
    write_atomic(step_dir / MARKER, data)


def read_marker(data: bytes, where: str) -> dict[str, Any]:
    try:
        m = json.loads(data)
        if not isinstance(m.get("files"), dict) or not isinstance(m.get("step"), int):
            raise ValueError("no files/step")
        return m
    except ValueError as err:
        raise CheckpointError(
            f"{where}: unreadable {MARKER} marker ({err}); delete that checkpoint folder"
        ) from None


def local_complete(step_dir: Path, fingerprint: str | None = None) -> bool:
    """True when the marker exists, was written for `fingerprint` (when given: the run's training inputs
    and settings; a checkpoint of another configuration is never resumed) and every file it lists is
    present with its recorded size."""
    mk = step_dir / MARKER
    if not mk.is_file():
        return False
    try:
        m = read_marker(mk.read_bytes(), str(mk))
    except CheckpointError:
        return False
    if fingerprint is not None and m.get("fingerprint") != fingerprint:
        return False
    return all(
        (step_dir / rel).is_file() and (step_dir / rel).stat().st_size == f["bytes"]
        for rel, f in m["files"].items()
    )


def local_steps(root: Path, fingerprint: str | None = None) -> list[int]:
    """Steps of the complete checkpoints under `root` (of `fingerprint` when given), ascending."""
    if not root.is_dir():
        return []
    steps = [step_of(p.name) for p in root.iterdir() if p.is_dir()]
    return sorted(s for s in steps if s is not None and local_complete(root / tag(s), fingerprint))


def store_steps(store: ArtifactStore | None, prefix: str, fingerprint: str | None = None) -> list[int]:
    """Steps of the checkpoints in the store whose marker exists (and names `fingerprint`), ascending."""
    if store is None:
        return []
    out = set()
    for key in store.list(f"{prefix}/"):
        rest = key[len(prefix) + 1 :].split("/")
        if len(rest) == 2 and rest[1] == MARKER and (s := step_of(rest[0])) is not None:
            if fingerprint is not None:
                try:
                    if read_marker(store.get_bytes(key), key).get("fingerprint") != fingerprint:
                        continue
                except CheckpointError:
                    continue
            out.add(s)
    return sorted(out)


def choose_resume(local: Iterable[int], stored: Iterable[int]) -> tuple[int, str] | None:
    """The newest complete checkpoint and where it is ("local" preferred on a tie: no download)."""
    local, stored = set(local), set(stored)
    if not local and not stored:
        return None
    step = max(local | stored)
    return step, ("local" if step in local else "store")


def upload(store: ArtifactStore, prefix: str, step_dir: Path, files: Iterable[str]) -> None:
    for rel in files:
        store.upload(step_dir / rel, f"{prefix}/{step_dir.name}/{rel}")


def download(store: ArtifactStore, prefix: str, step: int, root: Path) -> Path:
    """Fetch checkpoint `step` into root/step-N, checking each file against the marker; marker last."""
    base = f"{prefix}/{tag(step)}"
    mk = read_marker(store.get_bytes(f"{base}/{MARKER}"), f"{base}/{MARKER}")
    dest = root / tag(step)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / MARKER).unlink(missing_ok=True)
    for rel, f in mk["files"].items():
        p = dest / rel
        if p.is_file() and p.stat().st_size == f["bytes"] and sha256_file(p) == f["sha256"]:
            continue  # already here (e.g. this node wrote it)
        p.parent.mkdir(parents=True, exist_ok=True)
        store.download(f"{base}/{rel}", p)
        if sha256_file(p) != f["sha256"]:
            p.unlink()
            raise CheckpointError(
                f"{base}/{rel}: checksum mismatch after download; delete {base}/ in the "
                "store to fall back to the previous checkpoint"
            )
    write_local_marker(dest, json.dumps(mk, indent=1, sort_keys=True).encode())
    return dest


def _marker_fingerprint(data: bytes, where: str) -> str | None:
    try:
        return read_marker(data, where).get("fingerprint")
    except CheckpointError:
        return None


def drop_foreign_local(root: Path, fingerprint: str) -> list[int]:
    """Delete the complete checkpoints of another configuration (a changed spec or changed inputs): they
    can never be resumed, and left alone they would crowd this run's checkpoints out of the kept set."""
    removed = []
    if not root.is_dir():
        return removed
    for p in root.iterdir():
        s, mk = step_of(p.name), p / MARKER
        if s is not None and mk.is_file() and _marker_fingerprint(mk.read_bytes(), str(mk)) != fingerprint:
            mk.unlink(missing_ok=True)
            shutil.rmtree(p, ignore_errors=True)
            removed.append(s)
    return sorted(removed)


def drop_foreign_store(store: ArtifactStore, prefix: str, fingerprint: str) -> list[int]:
    """drop_foreign_local for the store."""
    removed = []
    for s in store_steps(store, prefix):
        key = f"{prefix}/{tag(s)}/{MARKER}"
        if _marker_fingerprint(store.get_bytes(key), key) != fingerprint:
            store.delete_prefix(key)
            store.delete_prefix(f"{prefix}/{tag(s)}/")
            removed.append(s)
    return removed


def prune_local(root: Path, keep: int) -> list[int]:
    """Delete all but the newest `keep` complete checkpoints, and any incomplete folder older than those."""
    complete = local_steps(root)
    kept = set(complete[-keep:])
    newest = max(kept) if kept else None
    removed = []
    if not root.is_dir():
        return removed
    for p in root.iterdir():
        s = step_of(p.name)
        if s is None or s in kept or (newest is not None and s > newest) or (newest is None):
            continue
        (p / MARKER).unlink(missing_ok=True)  # marker first: a half-deleted folder is never "complete"
        shutil.rmtree(p, ignore_errors=True)
        removed.append(s)
    return sorted(removed)


def prune_store(store: ArtifactStore, prefix: str, keep: int) -> list[int]:
    """As prune_local, in the store: all but the newest `keep` complete checkpoints go, and so do the
    leftovers of uploads cut short (no marker) that are older than those."""
    complete = store_steps(store, prefix)
    kept = set(complete[-keep:]) if keep > 0 else set()
    if not kept:
        return []
    newest = max(kept)
    present = {step_of(k[len(prefix) + 1 :].split("/")[0]) for k in store.list(f"{prefix}/")}
    removed = []
    for s in sorted(x for x in present if x is not None and x < newest and x not in kept):
        base = f"{prefix}/{tag(s)}"
        store.delete_prefix(f"{base}/{MARKER}")  # marker first, as locally
        store.delete_prefix(f"{base}/")
        removed.append(s)
    return removed
