"""The DeepSpeed training loop: our optimizer and schedule, packed fused blocks, checkpoints, preemption.

One process per rank, started with torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT; see jobs.stages.train for the launcher). DeepSpeed picks NCCL on CUDA and gloo on CPU.

Each optimizer step: grad_accum micro-batches per rank, loss = lambda * CLM + (1 - lambda) * fusion
(fusion.loss), DeepSpeed averages gradients over micro-batches and ranks, clips, steps our AdamW and our
LR schedule. After the step one small all-reduce gathers the loss parts, token count and the stop flag, so
every rank agrees on the logged figures and on when to stop.

Checkpoints (every checkpoint_interval steps, and when SIGTERM asks us to stop): engine.save_checkpoint
into <work>/checkpoints/step-N plus the data position and RNG states, then (per node) hashed and uploaded to
the store, then the COMPLETE marker written last by rank 0. On SIGTERM the current step finishes, the
checkpoint is saved and the process exits with EXIT_PREEMPTED, distinct from success and from failures.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fusion.atomic import write_atomic
from fusion.train import checkpoint as ckpt
from fusion.train.config import TrainConfig, deepspeed_config, total_steps, use_bf16
from fusion.train.data import DataState, FusedBlocks
from fusion.train.schedule import make_scheduler

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "stopped on request, checkpoint saved, run me again"
STATE_FILE = "fusionrun_state.json"
REQUIRED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class TrainIO:
    """Where a run reads and writes: a local work folder, and optionally the artifact store + key prefix
    (`train/<variant>`) for checkpoints and the progress file."""

    work_dir: Path
    store: ckpt.ArtifactStore | None = None
    prefix: str = "train/fused"
    fingerprint: str | None = None  # what the run trains on and how; checkpoints of another are ignored

    @property
    def local_checkpoints(self) -> Path:
        return self.work_dir / "checkpoints"

    @property
    def store_checkpoints(self) -> str:
        return f"{self.prefix}/checkpoints"


@dataclass
class TrainResult:
    steps_done: int
    total_steps: int
    preempted: bool
    resumed_from: int | None
    weights_digest: str | None = None
    export_dir: Path | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


class _StopFlag:
    """Set by SIGTERM (Kubernetes preemption / eviction); read at step boundaries."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True


def check_dist_env(environ: dict[str, str] | os._Environ) -> None:
    missing = [k for k in REQUIRED_ENV if not environ.get(k)]
    if missing:
        raise RuntimeError(
            f"distributed training needs {', '.join(missing)} in the environment "
            "(torchrun-style): start ranks with the launcher in jobs.stages.train"
        )


def _disable_cpu_shm_comm() -> None:
    """On CPU DeepSpeed JIT-compiles its shared-memory comm op (30-40 s, g++) at every fresh init. That op
    only serves inference_all_reduce (tensor-parallel inference); training collectives go through gloo. So
    we mark it unavailable, which DeepSpeed then treats as 'fall back to torch.distributed'."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: norms' gains and biases (1-D) are not decayed (as HF Trainer does)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _rng_state() -> dict[str, Any]:
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _checkpointing_on(model: Any) -> bool:
    """Whether activation (gradient) checkpointing is on; transformers 5 renamed the property."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def _log(record: dict[str, Any]) -> None:
    print(json.dumps(record, sort_keys=True), flush=True)


def train(
    cfg: TrainConfig,
    model: Any,
    blocks: FusedBlocks,
    io: TrainIO,
    tokenizer: Any = None,
    export: bool = True,
    trace_blocks: bool = False,
    fresh: bool = False,
    log: Callable[[dict[str, Any]], None] = _log,
) -> TrainResult:
    """Train `model` on `blocks` with DeepSpeed, resuming from the newest complete checkpoint if any.

    Every rank calls this. Returns on completion (after export) or after a SIGTERM-triggered checkpoint
    (preempted=True: exit with EXIT_PREEMPTED). fresh: delete every checkpoint first and start from step
    0 (a forced rerun). trace_blocks adds each rank's block ids to its step log
    (tests use it to check that a resumed run sees every block exactly once)."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from fusion.loss import fusion_loss
    from fusion.train.export import export_hf, weights_digest

    check_dist_env(os.environ)
    stop = _StopFlag()
    stop.install()
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        _disable_cpu_shm_comm()
    if on_gpu:  # before any collective: NCCL binds each rank to its own GPU
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ["LOCAL_RANK"])
    node_leader = local_rank == 0
    try:
        torch.manual_seed(cfg.seed + rank)
        random.seed(cfg.seed + rank)
        np.random.seed((cfg.seed + rank) % 2**32)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.config.use_cache = False
        model.train()

        steps = total_steps(cfg, blocks.n_blocks, world)
        optimizer = torch.optim.AdamW(
            param_groups(model, cfg.weight_decay),
            lr=cfg.learning_rate,
            betas=tuple(cfg.betas),
            weight_decay=cfg.weight_decay,
        )
        scheduler = make_scheduler(optimizer, steps, cfg.warmup_ratio, cfg.schedule, cfg.min_lr_ratio)
        bf16 = use_bf16(cfg.dtype, on_gpu, on_gpu and torch.cuda.is_bf16_supported())
        ds_config = deepspeed_config(cfg, world, bf16)
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        device = engine.device
        if rank == 0:
            log(
                {
                    "event": "start",
                    "world_size": world,
                    "zero_stage": cfg.zero_stage,
                    "bf16": bf16,
                    "total_steps": steps,
                    "blocks": blocks.n_blocks,
                    "variant": cfg.variant,
                    "lambda": cfg.effective_lambda,
                    "gradient_checkpointing": _checkpointing_on(engine.module),
                    "device": str(device),
                }
            )

        # ---- resume
        state, step, resumed_from = DataState(), 0, None
        choice = [None]
        decided = [fresh]  # rank 0's view decides: the others may have read the store at another moment
        dist.broadcast_object_list(decided, src=0)
        if decided[0]:
            if rank == 0 and io.store is not None:
                io.store.delete_prefix(f"{io.store_checkpoints}/")
            if node_leader:
                shutil.rmtree(io.local_checkpoints, ignore_errors=True)
            dist.barrier()
        if io.fingerprint is not None:  # checkpoints of another configuration are stale: clear them first
            if rank == 0 and io.store is not None:
                ckpt.drop_foreign_store(io.store, io.store_checkpoints, io.fingerprint)
            if node_leader:
                ckpt.drop_foreign_local(io.local_checkpoints, io.fingerprint)
            dist.barrier()
        if rank == 0:
            choice = [
                ckpt.choose_resume(
                    ckpt.local_steps(io.local_checkpoints, io.fingerprint),
                    ckpt.store_steps(io.store, io.store_checkpoints, io.fingerprint),
                )
            ]
        dist.broadcast_object_list(choice, src=0)
        if choice[0] is not None:
            resumed_from = choice[0][0]
            step_dir = io.local_checkpoints / ckpt.tag(resumed_from)
            if node_leader and not ckpt.local_complete(step_dir, io.fingerprint):
                if io.store is None:
                    raise ckpt.CheckpointError(f"{step_dir}: checkpoint missing on this node and no store")
                ckpt.download(io.store, io.store_checkpoints, resumed_from, io.local_checkpoints)
            dist.barrier()
            load_path, _ = engine.load_checkpoint(str(io.local_checkpoints), tag=ckpt.tag(resumed_from))
            if load_path is None:
                raise ckpt.CheckpointError(
                    f"{step_dir}: DeepSpeed could not load it; delete the folder "
                    "(and its copy in the store) to fall back to an older one"
                )
            saved = json.loads((step_dir / STATE_FILE).read_text())
            state, step = DataState.from_json(saved["data"]), int(saved["step"])
            rng_file = step_dir / f"rng-rank{rank}.pt"
            if rng_file.is_file():  # absent when the world size changed: seeds then differ, data does not
                _set_rng_state(torch.load(rng_file, weights_only=False))
            if rank == 0:
                log({"event": "resumed", "step": step, "data": state.to_json(), "from": str(step_dir)})

        def save(step_now: int, data_now: DataState) -> None:
            root = io.local_checkpoints
            t = ckpt.tag(step_now)
            engine.save_checkpoint(str(root), tag=t)
            step_dir = root / t
            torch.save(_rng_state(), step_dir / f"rng-rank{rank}.pt")
            if rank == 0:
                (step_dir / STATE_FILE).write_text(
                    json.dumps(
                        {
                            "step": step_now,
                            "data": data_now.to_json(),
                            "total_steps": steps,
                            "world_size": world,
                            "config": cfg.to_json(),
                        },
                        sort_keys=True,
                    )
                )
            dist.barrier()
            files = {}
            if node_leader:
                files = ckpt.hash_files(step_dir)
                if io.store is not None:
                    ckpt.upload(io.store, io.store_checkpoints, step_dir, files)
            gathered = [None] * world
            dist.all_gather_object(gathered, files)
            merged: dict[str, Any] = {}
            for part in gathered:
                merged.update(part or {})
            marker = ckpt.marker_bytes(
                step_now,
                merged,
                {"world_size": world, "zero_stage": cfg.zero_stage, "fingerprint": io.fingerprint},
            )
            if node_leader:
                ckpt.write_local_marker(step_dir, marker)
            dist.barrier()
            if rank == 0 and io.store is not None:
                io.store.put_bytes(f"{io.store_checkpoints}/{t}/{ckpt.MARKER}", marker)  # last: complete
                ckpt.prune_store(io.store, io.store_checkpoints, cfg.keep_checkpoints)
            if node_leader:
                ckpt.prune_local(root, cfg.keep_checkpoints)
            dist.barrier()
            if rank == 0:
                log({"event": "checkpoint", "step": step_now, "dir": str(step_dir), "files": len(merged)})

        # ---- train
        lam = cfg.effective_lambda
        with_targets = cfg.variant == "fused"
        history: list[dict[str, Any]] = []
        t_start, steps_at_start, last_progress = time.time(), step, 0.0
        preempted = False
        while step < steps:
            t0 = time.time()
            # total, clm, fusion, tokens, stop: summed on the device (no host sync per micro-batch), then one
            # all-reduce per step (NCCL needs device tensors)
            sums = torch.zeros(5, dtype=torch.float64, device=device)
            my_blocks: list[int] = []
            lr_applied = None
            for micro in range(cfg.grad_accum):
                batch, state = blocks.next_batch(state, world, rank, cfg.micro_batch_size)
                my_blocks += batch.block_ids.tolist()
                t = batch.torch(device)
                logits = engine(input_ids=t["input_ids"]).logits
                if with_targets:
                    tid, tpr = t["target_ids"], t["target_probs"]
                else:  # CLM-only baseline: no fused targets are read; a zero-width target is empty
                    tid = torch.full((*t["labels"].shape, 0), -1, dtype=torch.long, device=device)
                    tpr = torch.zeros((*t["labels"].shape, 0), dtype=torch.float32, device=device)
                parts = fusion_loss(logits, t["labels"], tid, tpr, t["fusion_mask"], lam, cfg.loss_kind)
                engine.backward(parts.total)
                if micro == cfg.grad_accum - 1:
                    lr_applied = float(ds_optimizer.param_groups[0]["lr"])  # what this update uses
                engine.step()
                sums[:3] += torch.stack([parts.total, parts.clm, parts.fusion]).detach().double()
                sums[3] += batch.n_tokens
            sums[4] = 1.0 if stop.requested else 0.0
            dist.all_reduce(sums)
            sums = sums.cpu()
            step += 1
            n_micro = cfg.grad_accum * world
            dt = time.time() - t0
            elapsed = time.time() - t_start
            rate = (step - steps_at_start) / max(elapsed, 1e-9)
            rec = {
                "event": "step",
                "step": step,
                "total_steps": steps,
                "loss": sums[0].item() / n_micro,
                "clm_loss": sums[1].item() / n_micro,
                "fusion_loss": sums[2].item() / n_micro if with_targets else None,
                "lr": lr_applied,
                "tokens": int(sums[3].item()),
                "tokens_per_s": sums[3].item() / dt,
                "step_s": dt,
                "eta_seconds": (steps - step) / rate if rate > 0 else None,
                "epoch": state.epoch,
            }
            history.append(rec)
            if trace_blocks:
                log({**rec, "event": "step_rank", "rank": rank, "blocks": my_blocks})
            if rank == 0:
                log(rec)
                if time.time() - last_progress >= cfg.progress_interval_s or step == steps:
                    _write_progress(io, rec)
                    last_progress = time.time()
            stopping = sums[4].item() > 0
            if stopping or step % cfg.checkpoint_interval == 0:
                save(step, state)
            if stopping:
                preempted = step < steps
                if rank == 0 and preempted:
                    _write_progress(io, {**rec, "state": "preempted"})
                    log({"event": "preempted", "step": step, "exit_code": EXIT_PREEMPTED})
                break

        result = TrainResult(step, steps, preempted, resumed_from, history=history)
        if preempted:
            return result
        result.weights_digest = weights_digest(engine)
        if export:
            result.export_dir = export_hf(engine, tokenizer, io.work_dir / "model")
        log({"event": "done", "rank": rank, "step": step, "weights_sha256": result.weights_digest})
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()  # ZeRO-3 aborts at exit otherwise


def _write_progress(io: TrainIO, rec: dict[str, Any]) -> None:
    """progress.json for the operator: step, total_steps, losses, tokens/s, lr, ETA, time of update."""
    keys = ("step", "total_steps", "loss", "clm_loss", "fusion_loss", "tokens_per_s", "lr", "eta_seconds")
    doc = {k: rec.get(k) for k in keys}
    doc["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if "state" in rec:
        doc["state"] = rec["state"]
    data = json.dumps(doc, sort_keys=True).encode()
    if io.store is not None:
        io.store.put_bytes(f"{io.prefix}/progress.json", data)
    else:
        write_atomic(io.work_dir / "progress.json", data)


def exit_code(result: TrainResult) -> int:
    return EXIT_PREEMPTED if result.preempted else 0
