"""Typed training configuration and the DeepSpeed config generated from it.

`TrainConfig` holds what shapes the training itself, and nothing else: the train stage (jobs.stages.train)
derives it field by field from the FusionRun spec's `training` section (plus the variant); fusion never
imports jobs. Where checkpoints go and how many are kept is the run's I/O (loop.TrainIO); how often
progress is published is the reporter's business.

The generated DeepSpeed config has NO optimizer and NO scheduler block: ours are passed to
`deepspeed.initialize` as objects, so nothing can silently override the learning rate, betas or schedule
that the spec asks for (the reference's defect 3).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

Variant = Literal["fused", "clm"]


@dataclass(frozen=True)
class TrainConfig:
    variant: Variant = "fused"
    lam: float = 0.9  # weight of the CLM loss; the "clm" variant forces 1.0 (see `effective_lambda`)
    lam_final: float | None = None  # the weight at the last step (linear from lam); None: lam throughout
    loss_kind: Literal["ce", "kl"] = "ce"
    learning_rate: float = 1e-5
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.008
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    max_steps: int | None = None
    epochs: float = 1.0
    micro_batch_size: int = 1
    grad_accum: int = 16
    seq_len: int = 2048
    zero_stage: int = 2
    gradient_checkpointing: bool = False
    checkpoint_interval: int = 500
    seed: int = 42
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"

    def __post_init__(self) -> None:
        problems = []
        if self.variant not in ("fused", "clm"):
            problems.append(f"variant must be fused or clm, got {self.variant!r}")
        if not 0.0 <= self.lam <= 1.0:
            problems.append(f"lambda must be in [0, 1], got {self.lam}")
        if self.lam_final is not None and not 0.0 <= self.lam_final <= 1.0:
            problems.append(f"lambdaFinal must be in [0, 1], got {self.lam_final}")
        if self.zero_stage not in (0, 1, 2, 3):
            problems.append(f"zeroStage must be 0, 1, 2 or 3, got {self.zero_stage}")
        for name in ("micro_batch_size", "grad_accum", "checkpoint_interval"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            problems.append(f"seq_len must be >= 2, got {self.seq_len}")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps must be >= 1 or unset, got {self.max_steps}")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))

    @property
    def effective_lambda(self) -> float:
        """The CLM-only baseline trains on the same blocks with lambda = 1."""
        return 1.0 if self.variant == "clm" else self.lam

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def global_batch_blocks(cfg: TrainConfig, world_size: int) -> int:
    """Blocks (sequences of seq_len tokens) consumed by one optimizer step across all ranks."""
    return cfg.micro_batch_size * cfg.grad_accum * world_size


def total_steps(cfg: TrainConfig, n_blocks: int, world_size: int) -> int:
    """max_steps when set, else enough steps for `epochs` passes: every block is seen at least once."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    if n_blocks < 1:
        raise ValueError("the training data holds no tokens: check the fuse stage's shards")
    return max(1, math.ceil(cfg.epochs * n_blocks / global_batch_blocks(cfg, world_size)))


def use_bf16(dtype: str, on_gpu: bool, gpu_supports_bf16: bool) -> bool:
    """auto: bf16 on GPUs that have it, fp32 on CPU (bf16 matmuls on CPU are slow and lossy)."""
    if dtype == "bfloat16":
        return True
    if dtype == "float32":
        return False
    return on_gpu and gpu_supports_bf16


def deepspeed_config(cfg: TrainConfig, world_size: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config: batch shape, ZeRO stage, precision, clipping. No optimizer/scheduler blocks."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage in (1, 2):
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_scatter=True)
    if cfg.zero_stage == 3:
        # Export gathers the full weights through engine._zero3_consolidated_16bit_state_dict.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # we log ourselves, as JSON lines
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": False},
    }
    if bf16:
        ds["bf16"] = {"enabled": True}
    return ds
