"""FuseLLM continual training with DeepSpeed, as components that `loop.Trainer` puts together:

  config              TrainConfig (what shapes the training) and the DeepSpeed config derived from it
  data                fused shards packed into blocks, a seeded order, per-rank shares, an exact position
  schedule            the learning-rate rule, handed to DeepSpeed as an object
  engine              setup: process group, seeds, optimizer, schedule, the DeepSpeed engine
  losses              the loss injected per variant: ClmLoss (CLM-only), FusionLoss (FuseLLM)
  step                one optimizer step: micro-batches, accumulation, one all-reduce of its figures
  checkpoint          the file rules: markers, choice, transfer, pruning
  checkpoint_manager  save / resume / prune / SIGTERM flag, collective over the ranks
  reporting           StepMetrics and the reporter interface the caller injects
  loop                the Trainer; export: the Hugging Face folder and the weights' digest

Modules import torch/deepspeed lazily inside functions where they can, so that `fusion.train.config`,
`schedule`, `data`, `checkpoint` and `reporting` stay cheap to import (the stage entrypoint decides
before it trains).
"""
