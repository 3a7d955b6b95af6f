"""The loss injected per variant (fusion.train.losses): hand-computed values and gradients, and the CLM-only
loss never asking for a fused target."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch

from fusion.loss import clm_loss, fusion_loss
from fusion.train.config import TrainConfig
from fusion.train.data import DataState, FusedBlocks, ShardSource
from fusion.train.losses import ClmLoss, FusionLoss, make_loss
from tests.test_train_data import tiny_shard  # noqa: F401  (fixture)

LN2, LN3 = math.log(2), math.log(3)


class RecordingBatch(Mapping):
    """A batch that records which keys are read (and has no fused targets at all)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors, self.read = tensors, set()

    def __getitem__(self, key: str) -> torch.Tensor:
        self.read.add(key)
        return self.tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def two_positions() -> tuple[torch.Tensor, torch.Tensor]:
    """V = 3, logits (0, ln 2, ln 3) at every position -> p = (1/6, 2/6, 3/6); golds 2 and 1, one ignored."""
    logits = torch.tensor([[[0.0, LN2, LN3]] * 3])
    labels = torch.tensor([[2, 1, -100]])
    return logits, labels


def test_clm_loss_value_and_gradient_by_hand() -> None:
    logits, labels = two_positions()
    x = logits.clone().requires_grad_(True)
    parts = ClmLoss()(x, {"labels": labels})
    want = (-math.log(3 / 6) - math.log(2 / 6)) / 2  # mean over the two real positions
    assert parts.total.item() == pytest.approx(want, abs=1e-6)
    assert parts.clm is parts.total and parts.fusion is None
    parts.total.backward()
    # d/dlogits = (softmax - onehot(gold)) / number of real positions; zero where the label is ignored
    expected = torch.tensor([[[1 / 6, 2 / 6, -3 / 6], [1 / 6, -4 / 6, 3 / 6], [0.0, 0.0, 0.0]]]) / 2
    torch.testing.assert_close(x.grad, expected, atol=1e-6, rtol=0)


def test_clm_loss_reads_only_the_labels() -> None:
    logits, labels = two_positions()
    batch = RecordingBatch({"input_ids": torch.zeros(1, 3, dtype=torch.long), "labels": labels})
    ClmLoss()(logits, batch)
    assert batch.read == {"labels"}
    with pytest.raises(KeyError, match="target_ids"):  # the fusion loss does need targets
        FusionLoss(0.9)(logits, RecordingBatch({"labels": labels}))


def test_clm_only_trains_on_blocks_without_targets(tiny_shard: Path) -> None:  # noqa: F811
    fb = FusedBlocks([ShardSource(tiny_shard)], seq_len=4, seed=0, with_targets=False)
    batch, _ = fb.next_batch(DataState(), world_size=1, rank=0, micro_batch=2)
    tensors = batch.torch("cpu")
    assert not {"target_ids", "target_probs"} & set(tensors)  # the loader built none
    logits = torch.randn(2, 4, 18, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(make_loss(TrainConfig(variant="clm"))(logits, tensors).total)


def test_clm_loss_is_the_clm_term_of_the_fusion_loss_bit_for_bit() -> None:
    """Same kernel operations: the CLM-only baseline gives the numbers it gave when it ran through
    fusion_loss with zero-width targets and lambda 1 (before the loss was injected per variant)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 50, generator=g) * 3
    labels = torch.randint(0, 50, (2, 6), generator=g)
    labels[1, 4:] = -100
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    empty_ids = torch.full((2, 6, 0), -1, dtype=torch.long)
    old = fusion_loss(a, labels, empty_ids, torch.zeros(2, 6, 0), torch.ones(2, 6, dtype=torch.bool), 1.0)
    new = clm_loss(b, labels)
    assert torch.equal(old.total.detach(), new.detach())
    old.total.backward()
    new.backward()
    assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize(("lam", "kind"), [(0.9, "ce"), (0.5, "ce"), (0.5, "kl"), (0.0, "kl")])
def test_fusion_loss_by_hand(lam: float, kind: str) -> None:
    # one position, p = (1/6, 2/6, 3/6), gold 2; fused q = 0.5 on id 1 and 0.5 on id 2
    batch = {
        "labels": torch.tensor([[2]]),
        "target_ids": torch.tensor([[[1, 2, -1]]]),
        "target_probs": torch.tensor([[[0.5, 0.5, 0.0]]]),
        "fusion_mask": torch.tensor([[True]]),
    }
    parts = FusionLoss(lam, kind)(torch.tensor([[[0.0, LN2, LN3]]]), batch)
    clm = -math.log(3 / 6)
    ce = -(0.5 * math.log(2 / 6) + 0.5 * math.log(3 / 6))
    fus = ce if kind == "ce" else ce + 2 * 0.5 * math.log(0.5)  # KL = CE - H(q), H(q) = ln 2
    assert parts.clm.item() == pytest.approx(clm, abs=1e-6)
    assert parts.fusion.item() == pytest.approx(fus, abs=1e-6)
    assert parts.total.item() == pytest.approx(lam * clm + (1 - lam) * fus, abs=1e-6)


def test_make_loss_follows_the_variant() -> None:
    clm = make_loss(TrainConfig(variant="clm", lam=0.3, loss_kind="kl"))
    assert isinstance(clm, ClmLoss) and clm.uses_targets is False
    assert make_loss(TrainConfig(variant="fused", lam=0.3, loss_kind="kl")) == FusionLoss(0.3, "kl")
    assert make_loss(TrainConfig(variant="fused")).uses_targets is True
    with pytest.raises(ValueError, match=r"lambda must be in \[0, 1\], got 1.5"):
        FusionLoss(1.5)
    with pytest.raises(ValueError, match="'ce' or 'kl', got 'mse'"):
        FusionLoss(0.5, "mse")


def test_a_lambda_schedule_gives_each_step_its_own_loss() -> None:
    scheduled = make_loss(TrainConfig(variant="fused", lam=0.5, lam_final=1.0))
    assert scheduled == FusionLoss(0.5, "ce", lam_final=1.0)
    assert scheduled.at(0, 3) == FusionLoss(0.5, "ce") and scheduled.at(2, 3) == FusionLoss(1.0, "ce")
    assert FusionLoss(0.5).at(7, 9) == FusionLoss(0.5)  # no schedule: itself
    clm = make_loss(TrainConfig(variant="clm", lam=0.5, lam_final=0.9))
    assert clm.at(1, 3) is clm  # CLM-only is lambda 1 throughout
    with pytest.raises(ValueError, match=r"lambdaFinal must be in \[0, 1\], got 2"):
        TrainConfig(lam_final=2)


def test_trainer_refuses_the_fusion_loss_on_blocks_without_targets(tiny_shard: Path) -> None:  # noqa: F811
    from fusion.train.loop import Trainer, TrainIO

    fb = FusedBlocks([ShardSource(tiny_shard)], seq_len=4, seed=0, with_targets=False)
    with pytest.raises(ValueError, match="the fused loss needs fused targets"):
        Trainer(TrainConfig(variant="fused"), None, fb, TrainIO(tiny_shard.parent))
    Trainer(TrainConfig(variant="clm"), None, fb, TrainIO(tiny_shard.parent))  # fine: it reads none
