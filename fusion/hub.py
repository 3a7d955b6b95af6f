"""Locating model/tokenizer files and loading tokenizers of any family, without a model hub.

URIs understood here (s3:// is the jobs layer's business: it downloads first and passes a local path):
  /abs/path, ./rel/path, file:///abs/path     a local file or folder
  pkg://<python package>/<sub path>           a file or folder shipped inside an installed package, found
                                              with importlib.util.find_spec WITHOUT importing the package
  org/name, hf://org/name                     a Hugging Face id, passed to from_pretrained as is

Tokenizer sources (`load_tokenizer`), told apart by content, not by file name:
  a folder with tokenizer files (tokenizer.json / tokenizer_config.json / tokenizer.model)
  a folder + gguf_file, or a .gguf file        GGUF (e.g. SmolLM2): AutoTokenizer(..., gguf_file=...)
  a SentencePiece model file (e.g. Mistral v1 tokenizer.model.v1) -> a fast Llama-style tokenizer
  a tiktoken BPE ranks file (e.g. qwen.tiktoken) -> a byte-level BPE fast tokenizer with Qwen's
                                              pre-tokenizer regex and '<|endoftext|>' appended as EOS
"""

from __future__ import annotations

import base64
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from fusion.paths import HF_ID, hub_id, resolve_path  # noqa: F401  (part of this module's API)
from fusion.tokens import BYTE_TO_UNICODE

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


# Qwen(-1/2)'s pre-tokenizer split: like GPT-4's cl100k but digits one at a time (\p{N}, not \p{N}{1,3}).
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)
# Appended after the ranks, in this order, as Qwen does (ids 151643.. for qwen.tiktoken); the first is EOS.
TIKTOKEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

_SPM_NAMES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", *_SPM_NAMES)


class TokenizerLoadError(ValueError):
    """A tokenizer that cannot be located or used; the message names the URI and the fix."""


def sniff_tokenizer_file(path: Path) -> str:
    """'gguf' | 'tiktoken' | 'sentencepiece', by content: GGUF magic, 'base64 rank' lines, else protobuf."""
    with open(path, "rb") as f:
        head = f.read(256)
    if head.startswith(b"GGUF"):
        return "gguf"
    first = head.split(b"\n", 1)[0]
    if re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", first):
        return "tiktoken"
    if path.suffix == ".json":
        raise TokenizerLoadError(
            f"{path}: a lone JSON file is not loaded as a tokenizer; "
            "pass its folder (with tokenizer_config.json)"
        )
    return "sentencepiece"


_CACHE: dict[tuple[str, str | None], PreTrainedTokenizerBase] = {}
_LOCK = threading.Lock()


def load_tokenizer(uri: str, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    """Load (once per process per (uri, gguf_file)) the tokenizer at `uri`; it always has an EOS token.

    gguf_file names a GGUF file inside a folder URI; it is ignored when `uri` is itself a file. The returned
    tokenizer is shared: do not mutate it."""
    key = (uri, gguf_file)
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        tok = _load_uncached(uri, gguf_file)
        if tok.eos_token is None or tok.eos_token_id is None:
            raise TokenizerLoadError(
                f"tokenizer {uri}: has no EOS token, which every document ends with; use a tokenizer whose "
                'config sets eos_token (e.g. add "eos_token" to its tokenizer_config.json)'
            )
        _CACHE[key] = tok
        return tok


def _load_uncached(uri: str, gguf_file: str | None) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    hf = hub_id(uri)
    if hf is not None:
        return (
            AutoTokenizer.from_pretrained(hf, gguf_file=gguf_file)
            if gguf_file
            else AutoTokenizer.from_pretrained(hf)
        )
    path = resolve_path(uri)
    if not path.exists():
        raise TokenizerLoadError(f"tokenizer {uri}: {path} does not exist; check the URI (and the package)")
    if path.is_dir():
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                raise TokenizerLoadError(f"tokenizer {uri}: GGUF file {gguf_file!r} is not in {path}")
            return AutoTokenizer.from_pretrained(str(path), gguf_file=gguf_file)
        if any((path / name).is_file() for name in _HF_TOKENIZER_FILES):
            return AutoTokenizer.from_pretrained(str(path))
        raise TokenizerLoadError(
            f"tokenizer {uri}: folder {path} has no tokenizer files ({', '.join(_HF_TOKENIZER_FILES)}); "
            "point the URI at the tokenizer file itself, or set ggufFile for a GGUF folder"
        )
    kind = sniff_tokenizer_file(path)
    if kind == "gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if kind == "tiktoken":
        tok = tiktoken_tokenizer(path)
        tok.name_or_path = uri
        return tok
    return sentencepiece_tokenizer(path, uri)


def sentencepiece_tokenizer(path: Path, uri: str) -> PreTrainedTokenizerBase:
    """A fast Llama-style tokenizer from a SentencePiece model file of any name (needs protobuf)."""
    from transformers import LlamaTokenizer

    # transformers converts a SentencePiece model only when it is found as <folder>/tokenizer.model.
    with tempfile.TemporaryDirectory(prefix="spm-") as tmp:
        os.symlink(path.resolve(), Path(tmp) / "tokenizer.model")
        try:
            tok = LlamaTokenizer.from_pretrained(tmp)
        except Exception as err:
            raise TokenizerLoadError(
                f"tokenizer {uri}: {path} is neither GGUF, a tiktoken ranks file nor a readable "
                f"SentencePiece model ({type(err).__name__}: {err}); "
                "SentencePiece conversion needs the protobuf package"
            ) from err
    if len(tok) <= 3:
        raise TokenizerLoadError(f"tokenizer {uri}: SentencePiece conversion of {path} gave no vocabulary")
    tok.vocab_file = str(path.resolve())  # save_pretrained copies it; the temporary link is gone
    tok.name_or_path = uri
    return tok


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """token bytes -> rank from a tiktoken BPE file ('<base64 token> <rank>' per line)."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError:
                raise TokenizerLoadError(
                    f"{path}:{lineno}: not a tiktoken ranks line ('<base64 token> <rank>')"
                ) from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerLoadError(f"{path}: tiktoken ranks must be 0..n-1 without gaps")
    return ranks


def tiktoken_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """BPE merges that reproduce tiktoken's rank-ordered merging.

    Every split of a token into two vocabulary pieces is a merge, ordered by the rank of the result, then
    of the pieces (tiktoken merges the lowest-ranked adjacent pair; the extra splits never win earlier).
    Runs once per tokenizer file (~1 s for 151k tokens)."""
    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return [(left, right) for _, _, _, left, right in merges]


def tiktoken_tokenizer(
    path: Path, pattern: str = QWEN_PATTERN, specials: tuple[str, ...] = TIKTOKEN_SPECIALS
) -> PreTrainedTokenizerBase:
    """A byte-level BPE fast tokenizer equivalent to tiktoken's encoding of the ranks file."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ranks = read_tiktoken_ranks(path)
    table = str.maketrans({chr(b): c for b, c in enumerate(BYTE_TO_UNICODE)})

    def spell(token: bytes) -> str:
        return token.decode("latin-1").translate(table)

    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges = [(spell(a), spell(b)) for a, b in tiktoken_merges(ranks)]
    model = models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True)
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=specials[0])
