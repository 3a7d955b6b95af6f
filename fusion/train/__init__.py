"""FuseLLM continual training with DeepSpeed: config, data, schedule, checkpoints, loop, export.

Modules import torch/deepspeed lazily inside functions where they can, so that `fusion.train.config`,
`schedule`, `data` and `checkpoint` stay cheap to import (the stage entrypoint decides before it trains).
"""
