"""LR schedule (by hand), the generated DeepSpeed config, step counts: pure functions, no processes."""

from __future__ import annotations

import math

import pytest

from fusion.train.config import TrainConfig, deepspeed_config, total_steps, use_bf16
from fusion.train.schedule import lr_factor, make_scheduler, warmup_steps


def test_warmup_is_ceil_of_ratio_and_never_zero_lr():
    assert warmup_steps(1000, 0.008) == 8
    assert warmup_steps(10, 0.25) == 3  # ceil(2.5)
    assert warmup_steps(10, 0.0) == 0
    assert [lr_factor(s, 10, 0.25, "constant") for s in range(5)] == pytest.approx([1 / 3, 2 / 3, 1, 1, 1])


def test_cosine_with_floor_by_hand():
    # T = 10, W = 2, min 0.2: decay over 8 updates, p = (s - 2) / 8
    # s=2: 1.0   s=4: 0.2 + 0.8 * (1 + cos(pi/4)) / 2 = 0.2 + 0.4 * 1.7071068 = 0.8828427
    # s=6: 0.2 + 0.4 * (1 + 0) = 0.6   s=9: 0.2 + 0.4 * (1 + cos(7pi/8)) = 0.2 + 0.4 * 0.0761205 = 0.2304482
    got = [lr_factor(s, 10, 0.2, "cosine", 0.2) for s in (0, 1, 2, 4, 6, 9)]
    assert got == pytest.approx([0.5, 1.0, 1.0, 0.8828427, 0.6, 0.2304482], rel=1e-6)


def test_linear_decay_by_hand():
    # T = 5, no warmup, min 0: 1 - s/5
    assert [lr_factor(s, 5, 0.0, "linear") for s in range(5)] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])


def test_bad_schedule_inputs_are_named():
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        lr_factor(0, 10, 0.1, "step")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="total_steps must be >= 1"):
        lr_factor(0, 0, 0.1, "cosine")


def test_torch_scheduler_applies_the_rule_step_by_step():
    import torch

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=0.5)
    sched = make_scheduler(opt, 6, 0.5, "linear", 0.0)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # W = 3: 1/3, 2/3, 1, then linear over 3: 1, 2/3, 1/3 (times 0.5)
    assert seen == pytest.approx([0.5 / 3, 1 / 3, 0.5, 0.5, 1 / 3, 0.5 / 3])


def test_deepspeed_config_has_no_optimizer_or_scheduler_block():
    cfg = TrainConfig(micro_batch_size=2, grad_accum=8, zero_stage=3, grad_clip=0.5)
    ds = deepspeed_config(cfg, world_size=4, bf16=True)
    assert "optimizer" not in ds and "scheduler" not in ds  # ours are passed as objects (defect 3)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 8
    assert ds["train_batch_size"] == 64 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"] == {"enabled": True}
    assert "bf16" not in deepspeed_config(cfg, 1, bf16=False)


def test_precision_choice():
    assert use_bf16("auto", on_gpu=True, gpu_supports_bf16=True)
    assert not use_bf16("auto", on_gpu=False, gpu_supports_bf16=False)  # CPU trains in fp32
    assert not use_bf16("auto", on_gpu=True, gpu_supports_bf16=False)
    assert use_bf16("bfloat16", on_gpu=False, gpu_supports_bf16=False)


def test_total_steps_cover_every_block_once_per_epoch():
    cfg = TrainConfig(micro_batch_size=2, grad_accum=4, epochs=1.0)
    assert total_steps(cfg, n_blocks=100, world_size=2) == math.ceil(100 / 16) == 7
    assert total_steps(TrainConfig(micro_batch_size=2, grad_accum=4, epochs=2.5), 100, 2) == 16  # ceil(15.6)
    assert total_steps(TrainConfig(max_steps=3), 100, 2) == 3


def test_invalid_config_names_the_fields():
    with pytest.raises(ValueError, match=r"lambda must be in \[0, 1\].*zeroStage must be 0, 1, 2 or 3"):
        TrainConfig(lam=1.5, zero_stage=4)


def test_lambda_schedule_by_hand():
    from fusion.train.schedule import lambda_at

    assert [lambda_at(s, 5, 0.5, 1.0) for s in range(5)] == [0.5, 0.625, 0.75, 0.875, 1.0]
    assert [lambda_at(s, 3, 0.9, 0.3) for s in range(3)] == pytest.approx([0.9, 0.6, 0.3])
    assert {lambda_at(s, 5, 0.7, None) for s in range(5)} == {0.7}  # unset: lambda throughout
    assert lambda_at(0, 1, 0.5, 1.0) == 0.5  # one step: the first weight
    assert lambda_at(9, 5, 0.5, 1.0) == 1.0  # past the end (a longer resumed run): the last weight
