"""One optimizer step: grad_accum micro-batches on this rank, then one all-reduce of the step's figures.

DeepSpeed averages the gradients over micro-batches and ranks, clips, and steps our AdamW and schedule
at the last micro-batch (engine.step() before that only accumulates). The loss parts, the token count and
the stop flag are summed on the device (no host sync per micro-batch) and all-reduced once per step, so
every rank logs the same figures and all agree on when to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fusion.train.data import DataState, FusedBlocks
from fusion.train.engine import DistContext
from fusion.train.losses import TrainLoss


@dataclass(frozen=True)
class StepResult:
    data: DataState  # the data position after the step (all ranks' blocks consumed)
    sums: tuple[
        float, float, float, float
    ]  # total loss, CLM, fusion, tokens: summed over micro-batches x ranks
    stop: bool  # some rank was asked to stop (SIGTERM)
    learning_rate: float | None  # the rate the update used
    block_ids: list[int]  # this rank's blocks (for the exact-resume trace)


def train_step(
    engine: Any,
    optimizer: Any,
    blocks: FusedBlocks,
    data: DataState,
    loss: TrainLoss,
    grad_accum: int,
    micro_batch_size: int,
    dist: DistContext,
    stop_requested: bool,
) -> StepResult:
    import torch

    sums = torch.zeros(5, dtype=torch.float64, device=engine.device)  # total, clm, fusion, tokens, stop
    my_blocks: list[int] = []
    lr_applied = None
    for micro in range(grad_accum):
        batch, data = blocks.next_batch(data, dist.world, dist.rank, micro_batch_size)
        my_blocks += batch.block_ids.tolist()
        tensors = batch.torch(engine.device)
        parts = loss(engine(input_ids=tensors["input_ids"]).logits, tensors)
        engine.backward(parts.total)
        if micro == grad_accum - 1:
            lr_applied = float(optimizer.param_groups[0]["lr"])  # what this update uses
        engine.step()
        sums[:2] += torch.stack([parts.total, parts.clm]).detach().double()
        if parts.fusion is not None:
            sums[2] += parts.fusion.detach().double()
        sums[3] += batch.n_tokens
    sums[4] = 1.0 if stop_requested else 0.0
    dist.all_reduce_sum(sums)
    total, clm, fusion, tokens, stop = sums.cpu().tolist()
    return StepResult(data, (total, clm, fusion, tokens), stop > 0, lr_applied, my_blocks)
