"""Export the trained model as a plain Hugging Face folder, and fingerprint the full weights on every rank.

Under ZeRO-3 each rank holds only a slice of every parameter; the full state dict is gathered layer by
layer onto rank 0 with the engine's consolidated-state-dict routine (the one DeepSpeed's save_16bit_model
uses; the weights keep the training dtype). Under ZeRO 0-2 every rank holds the full weights already.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any


def full_state_dict(engine: Any) -> dict | None:
    """The full state dict on rank 0 (CPU tensors), None on other ranks. Call on every rank."""
    import torch.distributed as dist

    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    if dist.get_rank() != 0:
        return None
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


def plain_for_saving(module: Any) -> Any:
    """The module itself, or for a GGUF-loaded model (whose quantizer makes save_pretrained refuse, though
    its weights were dequantised at load) an unquantised skeleton of the same config on the meta device:
    save_pretrained then writes the given state dict without a second copy of the weights in memory."""
    quantized = getattr(module.config, "quantization_config", None) is not None
    if not quantized and not getattr(module, "hf_quantizer", None):
        return module
    import torch
    from transformers import AutoModelForCausalLM

    config = module.config.__class__.from_dict(module.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def export_hf(engine: Any, tokenizer: Any, out_dir: str | Path) -> Path | None:
    """Write model (safetensors + config) and tokenizer to out_dir on rank 0; returns the folder there,
    None elsewhere. Must be called on every rank (ZeRO-3 gathers collectively)."""
    import torch.distributed as dist

    state = full_state_dict(engine)
    out = Path(out_dir)
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        module = plain_for_saving(engine.module)
        module.config.use_cache = True  # training turned it off for gradient checkpointing
        module.save_pretrained(out, state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
    dist.barrier()
    return out if dist.get_rank() == 0 else None


def weights_digest(engine: Any) -> str:
    """sha256 over every parameter's full value (name-sorted); equal on all ranks iff their weights agree.

    Call on every rank: under ZeRO-3 each parameter is gathered in turn."""
    import deepspeed

    h = hashlib.sha256()
    zero3 = engine.zero_optimization_partition_weights()
    for name, p in sorted(engine.module.named_parameters(), key=lambda kv: kv[0]):
        if zero3:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                data = p.detach().float().cpu().contiguous()
        else:
            data = p.detach().float().cpu().contiguous()
        h.update(name.encode())
        h.update(data.numpy().tobytes())
    return h.hexdigest()
