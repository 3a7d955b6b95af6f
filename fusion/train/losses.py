"""The training objective of each variant, injected into the trainer: one small interface, two losses.

  ClmLoss     the CLM-only baseline: the causal-LM loss on the labels; it never reads a fused target (the
              data loader, built with `with_targets=False`, yields none).
  FusionLoss  FuseLLM: lambda * CLM + (1 - lambda) * loss towards the fused distribution (ce or kl), through
              fusion.loss.fusion_loss.

A loss takes the model's logits and the micro-batch's tensors (fusion.train.data.Batch.torch) and returns
LossParts; `uses_targets` tells the data loader whether to read the fused targets at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import NamedTuple, Protocol

import torch

from fusion.train.config import TrainConfig
from fusion.train.schedule import lambda_at


class LossParts(NamedTuple):
    total: torch.Tensor  # what is back-propagated
    clm: torch.Tensor  # the causal-LM term (logged)
    fusion: torch.Tensor | None  # the fusion term (logged); None for a loss that has none


class TrainLoss(Protocol):
    uses_targets: bool

    def __call__(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> LossParts: ...

    def at(self, step: int, total_steps: int) -> TrainLoss:
        """The loss of optimizer update `step` (a lambda schedule changes it; others return themselves)."""
        ...


@dataclass(frozen=True)
class ClmLoss:
    """The causal-LM loss alone; reads only batch["labels"]."""

    uses_targets: bool = False

    def at(self, step: int, total_steps: int) -> ClmLoss:
        return self

    def __call__(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> LossParts:
        from fusion.loss import clm_loss

        clm = clm_loss(logits, batch["labels"])
        return LossParts(clm, clm, None)


@dataclass(frozen=True)
class FusionLoss:
    """lam * CLM + (1 - lam) * fusion loss of `kind` (fusion.loss.fusion_loss); with `lam_final`, lam moves
    linearly to it over the training (`at`)."""

    lam: float
    kind: str = "ce"
    uses_targets: bool = True
    lam_final: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lambda must be in [0, 1], got {self.lam}")
        if self.kind not in ("ce", "kl"):
            raise ValueError(f"fusion loss kind must be 'ce' or 'kl', got {self.kind!r}")

    def at(self, step: int, total_steps: int) -> FusionLoss:
        if self.lam_final is None:
            return self
        return replace(self, lam=lambda_at(step, total_steps, self.lam, self.lam_final), lam_final=None)

    def __call__(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> LossParts:
        from fusion.loss import fusion_loss

        parts = fusion_loss(
            logits,
            batch["labels"],
            batch["target_ids"],
            batch["target_probs"],
            batch["fusion_mask"],
            self.lam,
            self.kind,
        )
        return LossParts(parts.total, parts.clm, parts.fusion)


def make_loss(cfg: TrainConfig) -> TrainLoss:
    """The loss of the config's variant: CLM-only for "clm", the fusion loss for "fused"."""
    if cfg.variant == "clm":
        return ClmLoss()
    return FusionLoss(cfg.lam, cfg.loss_kind, lam_final=cfg.lam_final)
