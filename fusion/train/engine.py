"""Trainer setup: the process group, seeds, the model's training mode, our optimizer and schedule, DeepSpeed.

One process per rank, started with torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT; see jobs.stages.train for the launcher). On CUDA each rank binds to GPU LOCAL_RANK before any
collective and DeepSpeed uses NCCL; on CPU it uses gloo. bf16 where the GPU supports it (config.use_bf16).

The generated DeepSpeed config has no optimizer and no scheduler block: ours go to deepspeed.initialize
as objects (config.deepspeed_config), so nothing silently overrides the learning rate or schedule.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fusion.train.config import TrainConfig, deepspeed_config, total_steps, use_bf16
from fusion.train.schedule import make_scheduler

REQUIRED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def check_dist_env(environ: Mapping[str, str]) -> None:
    missing = [k for k in REQUIRED_ENV if not environ.get(k)]
    if missing:
        raise RuntimeError(
            f"distributed training needs {', '.join(missing)} in the environment "
            "(torchrun-style): start ranks with the launcher in jobs.stages.train"
        )


@dataclass(frozen=True)
class DistContext:
    """This rank's place in the process group, and the few collectives the trainer uses."""

    rank: int
    world: int
    local_rank: int

    @property
    def node_leader(self) -> bool:
        """The first rank of its node: it alone touches the node's disk (local checkpoints)."""
        return self.local_rank == 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (a decision the others must not make from their own view)."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def all_reduce_sum(self, tensor: Any) -> None:
        """In place; `tensor` lives on the rank's device (NCCL reduces device tensors only)."""
        import torch.distributed as dist

        dist.all_reduce(tensor)


def _disable_cpu_shm_comm() -> None:
    """On CPU DeepSpeed JIT-compiles its shared-memory comm op (30-40 s, g++) at every fresh init. That op
    only serves inference_all_reduce (tensor-parallel inference); training collectives go through gloo. So
    we mark it unavailable, which DeepSpeed then treats as 'fall back to torch.distributed'."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(environ: Mapping[str, str] = os.environ) -> DistContext:
    """Join the process group: NCCL with one GPU per LOCAL_RANK on CUDA, gloo on CPU."""
    import deepspeed
    import torch
    import torch.distributed as dist

    check_dist_env(environ)
    local_rank = int(environ["LOCAL_RANK"])
    if torch.cuda.is_available():  # before any collective: NCCL binds each rank to its own GPU
        torch.cuda.set_device(local_rank)
    else:
        _disable_cpu_shm_comm()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank)


def close_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()  # ZeRO-3 aborts at exit otherwise


def seed_everything(seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: norms' gains and biases (1-D) are not decayed (as HF Trainer does)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def checkpointing_on(model: Any) -> bool:
    """Whether activation (gradient) checkpointing is on; transformers 5 renamed the property."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


@dataclass
class TrainSetup:
    engine: Any  # deepspeed.DeepSpeedEngine
    optimizer: Any  # the engine's optimizer (ZeRO's wrapper): param_groups hold the applied rates
    total_steps: int
    bf16: bool


def build_engine(cfg: TrainConfig, model: Any, n_blocks: int, dist: DistContext) -> TrainSetup:
    """Model in training mode, AdamW (no decay on 1-D params), our LR schedule, the DeepSpeed engine."""
    import deepspeed
    import torch

    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    model.train()
    steps = total_steps(cfg, n_blocks, dist.world)
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.learning_rate,
        betas=tuple(cfg.betas),
        weight_decay=cfg.weight_decay,
    )
    scheduler = make_scheduler(optimizer, steps, cfg.warmup_ratio, cfg.schedule, cfg.min_lr_ratio)
    on_gpu = torch.cuda.is_available()
    bf16 = use_bf16(cfg.dtype, on_gpu, on_gpu and torch.cuda.is_bf16_supported())
    engine, ds_optimizer, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, dist.world, bf16),
    )
    return TrainSetup(engine, ds_optimizer, steps, bf16)
