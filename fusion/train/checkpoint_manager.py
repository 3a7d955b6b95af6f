"""The checkpoint manager: save (locally, hashed, uploaded, COMPLETE marker last), resume, prune, preemption.

A checkpoint `step-N` is what `engine.save_checkpoint` writes plus the data position (STATE_FILE, rank 0)
and each rank's RNG states. Saving: every rank saves its part; each node's first rank hashes the node's
files and uploads them; the file lists are gathered; a hook (the history's flush) runs on rank 0; then the
markers: each node's local one, and last rank 0's in the store. Old checkpoints are pruned after that.

Resuming: rank 0 decides from its view of the local disk and of the store (the newest complete checkpoint
of this run's fingerprint; local preferred on a tie) and every rank follows. A node without that
checkpoint on its disk downloads it (checked against the marker's sha256s). Checkpoints of another
fingerprint (changed spec or inputs) are deleted first: they can never be resumed.

SIGTERM (Kubernetes preemption or eviction) only sets a flag; the trainer reads it at the step boundary,
saves and exits with EXIT_PREEMPTED. The file-level rules (markers, choice, transfer, pruning) are the pure
functions of fusion.train.checkpoint.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fusion.train import checkpoint as ckpt
from fusion.train.data import DataState
from fusion.train.engine import DistContext

STATE_FILE = "fusionrun_state.json"


class PreemptionFlag:
    """Set by SIGTERM; read at step boundaries (a signal handler must not start collectives or I/O)."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> PreemptionFlag:
        signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True


def rng_state() -> dict[str, Any]:
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass(frozen=True)
class ResumePoint:
    step: int
    data: DataState
    folder: Path


class CheckpointManager:
    """Checkpoints of one run: `local_root/step-N` on each node and `<store_prefix>/step-N` in the store.

    Every method is collective: call it on every rank, in the same order."""

    def __init__(
        self,
        engine: Any,
        dist: DistContext,
        local_root: Path,
        store: ckpt.ArtifactStore | None,
        store_prefix: str,
        fingerprint: str | None,
        keep: int,
        run_info: dict[str, Any] | None = None,
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
        self.engine, self.dist, self.local_root = engine, dist, local_root
        self.store, self.store_prefix, self.fingerprint, self.keep = store, store_prefix, fingerprint, keep
        self.run_info = run_info or {}  # written into each checkpoint's STATE_FILE (total steps, config)
        self.zero_stage = int(engine.zero_optimization_stage()) if engine is not None else None

    # ---- resume

    def resume(self, fresh: bool = False) -> ResumePoint | None:
        """Load the newest usable checkpoint into the engine and the RNGs; None when there is none.
        fresh: delete every checkpoint first (a forced rerun starts from step 0)."""
        if self.dist.broadcast(fresh):  # rank 0's view decides: the others may have read it at another time
            self.clear()
        self.drop_foreign()
        chosen = self.dist.broadcast(self._choice() if self.dist.is_main else None)
        if chosen is None:
            return None
        step_dir = self._fetch(chosen[0])
        load_path, _ = self.engine.load_checkpoint(str(self.local_root), tag=ckpt.tag(chosen[0]))
        if load_path is None:
            raise ckpt.CheckpointError(
                f"{step_dir}: DeepSpeed could not load it; delete the folder "
                "(and its copy in the store) to fall back to an older one"
            )
        saved = json.loads((step_dir / STATE_FILE).read_text())
        rng_file = step_dir / f"rng-rank{self.dist.rank}.pt"
        if rng_file.is_file():  # absent when the world size changed: seeds then differ, data does not
            import torch

            set_rng_state(torch.load(rng_file, weights_only=False))
        return ResumePoint(int(saved["step"]), DataState.from_json(saved["data"]), step_dir)

    def clear(self) -> None:
        """Delete every checkpoint of this run, in the store and on each node."""
        if self.dist.is_main and self.store is not None:
            self.store.delete_prefix(f"{self.store_prefix}/")
        if self.dist.node_leader:
            shutil.rmtree(self.local_root, ignore_errors=True)
        self.dist.barrier()

    def drop_foreign(self) -> None:
        """Delete the checkpoints of another fingerprint (no-op when the run has none)."""
        if self.fingerprint is None:
            return
        if self.dist.is_main and self.store is not None:
            ckpt.drop_foreign_store(self.store, self.store_prefix, self.fingerprint)
        if self.dist.node_leader:
            ckpt.drop_foreign_local(self.local_root, self.fingerprint)
        self.dist.barrier()

    def _choice(self) -> tuple[int, str] | None:
        return ckpt.choose_resume(
            ckpt.local_steps(self.local_root, self.fingerprint),
            ckpt.store_steps(self.store, self.store_prefix, self.fingerprint),
        )

    def _fetch(self, step: int) -> Path:
        """Checkpoint `step` on this node's disk, downloaded from the store where this node lacks it."""
        step_dir = self.local_root / ckpt.tag(step)
        if self.dist.node_leader and not ckpt.local_complete(step_dir, self.fingerprint):
            if self.store is None:
                raise ckpt.CheckpointError(f"{step_dir}: checkpoint missing on this node and no store")
            ckpt.download(self.store, self.store_prefix, step, self.local_root)
        self.dist.barrier()
        return step_dir

    # ---- save

    def save(self, step: int, data: DataState, before_marker: Callable[[], None] | None = None) -> int:
        """Save checkpoint `step` (data position `data`), mark it complete, prune; returns its file count.
        `before_marker` runs on rank 0 once every file is saved and uploaded, before any marker."""
        step_dir = self._write(step, data)
        files = self._hash_and_upload(step_dir)
        if self.dist.is_main and before_marker is not None:
            before_marker()
        self._mark_complete(step, step_dir, files)
        self._prune()
        return len(files)

    def _write(self, step: int, data: DataState) -> Path:
        import torch

        self.engine.save_checkpoint(str(self.local_root), tag=ckpt.tag(step))
        step_dir = self.local_root / ckpt.tag(step)
        torch.save(rng_state(), step_dir / f"rng-rank{self.dist.rank}.pt")
        if self.dist.is_main:
            doc = {"step": step, "data": data.to_json(), **self.run_info}
            (step_dir / STATE_FILE).write_text(json.dumps(doc, sort_keys=True))
        self.dist.barrier()
        return step_dir

    def _hash_and_upload(self, step_dir: Path) -> dict[str, Any]:
        """Each node's files hashed (and uploaded) by its leader; the union, on every rank."""
        files: dict[str, Any] = {}
        if self.dist.node_leader:
            files = ckpt.hash_files(step_dir)
            if self.store is not None:
                ckpt.upload(self.store, self.store_prefix, step_dir, files)
        merged: dict[str, Any] = {}
        for part in self.dist.all_gather(files):
            merged.update(part or {})
        return merged

    def _mark_complete(self, step: int, step_dir: Path, files: dict[str, Any]) -> None:
        meta = {"world_size": self.dist.world, "zero_stage": self.zero_stage, "fingerprint": self.fingerprint}
        marker = ckpt.marker_bytes(step, files, meta)
        if self.dist.node_leader:
            ckpt.write_local_marker(step_dir, marker)
        self.dist.barrier()
        if self.dist.is_main and self.store is not None:  # last: now the checkpoint exists for everyone
            self.store.put_bytes(f"{self.store_prefix}/{ckpt.tag(step)}/{ckpt.MARKER}", marker)

    def _prune(self) -> None:
        if self.dist.is_main and self.store is not None:
            ckpt.prune_store(self.store, self.store_prefix, self.keep)
        if self.dist.node_leader:
            ckpt.prune_local(self.local_root, self.keep)
        self.dist.barrier()
