"""Load, random-initialise and save causal LMs for extraction, training and evaluation.

Models come from a local folder (the jobs layer downloads s3:// first), a Hugging Face id (clusters with hub
access), a GGUF file inside a folder (dequantised on load), or are built randomly initialised for a given
vocabulary size (tests and tiny examples pair them with any real tokenizer). The vocabulary size of a model
may exceed the tokenizer's (padded vocabularies, e.g. Qwen): everything downstream uses len(tokenizer) for
the ids that stand for text and the model's own size for the logits.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from fusion.uris import strip_file

ARCHITECTURES = ("llama", "gpt_neox", "gemma3", "qwen2", "mistral")


class ModelLoadError(ValueError):
    """A model that cannot be built or loaded; the message names the model and the likely fix."""


def select_device(pref: str = "auto") -> torch.device:
    """`auto`: the GPU when there is one, else the CPU. `cuda` without a GPU is an error, not a fallback."""
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' requested but no CUDA GPU is visible; set device: auto or cpu")
    if pref not in ("cpu", "cuda"):
        raise ModelLoadError(f"unknown device {pref!r}; expected auto, cpu or cuda")
    return torch.device(pref)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def select_dtype(pref: str, device: torch.device | str) -> torch.dtype:
    """`auto`: bfloat16 on a GPU that supports it (as the reference extracts), float32 elsewhere.

    CPUs run bf16 matmuls slower than fp32 on most machines and fp32 keeps CPU results reproducible."""
    device = torch.device(device)
    if pref == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if pref not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {pref!r}; expected auto, {', '.join(_DTYPES)}")
    return _DTYPES[pref]


def _config_for(
    architecture: str,
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_position_embeddings: int,
    eos_token_id: int | None,
) -> Any:
    from transformers import (
        Gemma3TextConfig,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
    )

    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "eos_token_id": eos_token_id,
        "bos_token_id": None,
        "pad_token_id": None,
        "tie_word_embeddings": False,
    }
    if architecture == "llama":
        return LlamaConfig(num_key_value_heads=num_heads, **common)
    if architecture == "mistral":
        # Grouped-query attention as in Mistral-7B (2 query heads per KV head when the heads allow it).
        kv = num_heads // 2 if num_heads % 2 == 0 else num_heads
        return MistralConfig(num_key_value_heads=kv, sliding_window=None, **common)
    if architecture == "qwen2":
        return Qwen2Config(num_key_value_heads=num_heads, use_sliding_window=False, **common)
    if architecture == "gpt_neox":
        return GPTNeoXConfig(use_parallel_residual=True, **common)
    if architecture == "gemma3":
        # Text-only Gemma 3: head_dim is independent of hidden_size in Gemma (256 by default); keep it
        # hidden/heads so a tiny model stays tiny. Alternating sliding/full attention as the real model.
        layer_types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(num_layers)]
        return Gemma3TextConfig(
            num_key_value_heads=num_heads,
            head_dim=hidden_size // num_heads,
            layer_types=layer_types,
            sliding_window=512,
            **common,
        )
    raise ModelLoadError(f"unknown architecture {architecture!r}; expected one of {', '.join(ARCHITECTURES)}")


def random_init_model(
    architecture: str,
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    seed: int = 0,
    max_position_embeddings: int = 4096,
    eos_token_id: int | None = None,
) -> PreTrainedModel:
    """A randomly initialised causal LM of `architecture`, identical for the same arguments and seed.

    vocab_size is the model's (config.vocab_size): normally len(tokenizer), or more for a padded vocabulary.
    """
    from transformers import AutoModelForCausalLM

    if vocab_size < 2:
        raise ModelLoadError(f"vocab_size must be at least 2, got {vocab_size}")
    if hidden_size % num_heads:
        raise ModelLoadError(f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})")
    config = _config_for(
        architecture,
        vocab_size,
        hidden_size,
        num_layers,
        num_heads,
        intermediate_size or 4 * hidden_size,
        max_position_embeddings,
        eos_token_id,
    )
    # Seeded locally so building a model never disturbs the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def _load_hint(path: str, gguf_file: str | None, err: BaseException) -> str:
    """The most likely fix for a model that failed to load (pure: decided from the path and the error)."""
    text = f"{type(err).__name__}: {err}"
    p = Path(path)
    if "gguf" in text.lower() and "install" in text.lower():
        return "install the gguf package (pip install 'gguf>=0.10') to load GGUF weights"
    if p.exists():
        if p.is_file():
            return "uri must be the folder holding the weights; put a GGUF file's name in ggufFile"
        if gguf_file is not None and not (p / gguf_file).is_file():
            present = sorted(f.name for f in p.glob("*.gguf"))
            return f"ggufFile {gguf_file!r} is not in that folder (GGUF files there: {present})"
        if gguf_file is None and not (p / "config.json").is_file():
            ggufs = sorted(f.name for f in p.glob("*.gguf"))
            if ggufs:
                return f"the folder holds GGUF weights: set ggufFile to one of {ggufs}"
            return "the folder has no config.json: point uri at a Hugging Face model folder (save_pretrained)"
        return "the folder's weights or config are unreadable or of an architecture this transformers lacks"
    if os.path.isabs(path) or path.startswith((".", "file:")):
        return "the folder does not exist: check uri (s3:// models are downloaded by the jobs layer first)"
    return (
        "not a local folder, so it was tried as a Hugging Face id: check the id, or on machines without "
        "hub access copy the model to a folder or s3:// and set uri to it"
    )


def load_model(
    path: str | None,
    gguf_file: str | None = None,
    random_init: dict[str, Any] | None = None,
    vocab_size: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    eos_token_id: int | None = None,
) -> PreTrainedModel:
    """A causal LM in eval mode on `device` in `dtype`.

    random_init (the spec's randomInit fields, snake_case) builds a random model with `vocab_size`
    (len(tokenizer)); otherwise weights load from `path` (folder or HF id), GGUF weights from
    path/gguf_file (dequantised)."""
    from transformers import AutoModelForCausalLM

    dev = select_device(device)
    dt = select_dtype(dtype, dev)
    if random_init is not None:
        if vocab_size is None:
            raise ModelLoadError("randomInit needs vocab_size (len(tokenizer)) to size the embeddings")
        known = {"architecture", "hidden_size", "num_layers", "num_heads", "intermediate_size", "seed"}
        unknown = sorted(set(random_init) - known)
        if unknown:
            raise ModelLoadError(f"randomInit has unknown fields {unknown}; expected some of {sorted(known)}")
        model = random_init_model(vocab_size=vocab_size, eos_token_id=eos_token_id, **random_init)
        return model.to(device=dev, dtype=dt).eval()
    if not path:
        raise ModelLoadError("model has neither a path (uri) nor randomInit: set one of them")
    path = strip_file(str(path))
    if gguf_file is None and path.endswith(".gguf") and Path(path).is_file():
        path, gguf_file = str(Path(path).parent), Path(path).name
    try:
        kwargs: dict[str, Any] = {"dtype": dt}
        if gguf_file is not None:
            kwargs["gguf_file"] = gguf_file
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as err:
        where = f"{path}/{gguf_file}" if gguf_file else path
        raise ModelLoadError(
            f"model {where!r} did not load ({type(err).__name__}: {err}); "
            f"likely fix: {_load_hint(path, gguf_file, err)}"
        ) from err
    if vocab_size is not None and model.config.vocab_size < vocab_size:
        raise ModelLoadError(
            f"model {path!r} has {model.config.vocab_size} embedding rows but its tokenizer has {vocab_size} "
            "tokens: ids past the embedding would crash; pair the model with its own tokenizer"
        )
    return model.to(device=dev, dtype=dt).eval()


def save_hf(model: PreTrainedModel, tokenizer: Any, out_dir: str | os.PathLike) -> Path:
    """Save model (safetensors) and tokenizer as a plain Hugging Face folder that from_pretrained loads.

    GGUF-loaded models carry a quantization_config that makes save_pretrained refuse; their weights are
    already dequantised, so the model is rebuilt from the config without it and the state dict copied."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if getattr(model.config, "quantization_config", None) is not None or getattr(model, "hf_quantizer", None):
        config = model.config.__class__.from_dict(model.config.to_dict())
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        dtype = next(model.parameters()).dtype
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
        plain.load_state_dict(model.state_dict(), strict=True)
        model = plain
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
