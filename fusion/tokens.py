"""Tokens as the bytes of text they stand for, whatever the tokenizer family.

The FuseLLM reference compared tokens in each tokenizer's private spelling (defect 8 in
shared docs/fusellm.md): 'Ċ' (byte-level BPE's newline) against '<0x0A>' (SentencePiece's byte fallback) or
'▁' (SentencePiece's space marker). Here every token id is decoded once into the bytes it stands for and all
comparisons (vocabulary map, alignment) use those bytes:

  byte_level     (GPT-2 / SmolLM2 / Qwen): each character of a piece is one byte under GPT-2's printable
                 byte alphabet ('Ġ' = b' ', 'Ċ' = b'\\n', 'Ã©' = b'\\xc3\\xa9' = 'é')
  sentencepiece  (Llama / Mistral): '▁' = b' ', '<0xNN>' = the byte NN, anything else its UTF-8
  special tokens (EOS, BOS, <unk>, control tokens): b'' (they stand for no text)

SentencePiece tokenizers prepend a space to a text that does not start with one ("Hello" -> '▁Hello'), so
the first token of such a document carries one byte the text lacks; alignment cost treats that as one
edit, which does not move the path.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import cached_property
from operator import itemgetter, methodcaller
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def _gpt2_byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in character for each byte value (index = byte)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


BYTE_TO_UNICODE: list[str] = _gpt2_byte_alphabet()
# str.translate table: alphabet character -> the latin-1 character of its byte (so .encode('latin-1') = bytes)
_UNICODE_TO_LATIN1 = str.maketrans({c: chr(b) for b, c in enumerate(BYTE_TO_UNICODE)})
_ALPHABET = frozenset(BYTE_TO_UNICODE)
SPM_MARKER = "▁"
BPE_MARKER = BYTE_TO_UNICODE[ord(" ")]  # 'Ġ'
_BYTE_FALLBACK = {f"<0x{b:02X}>": b for b in range(256)}


class TokenizerSchemeError(ValueError):
    """A tokenizer whose tokens cannot be turned into the bytes they stand for."""


@dataclass(frozen=True, eq=False)
class TokenizerView:
    """Byte-level facts about one tokenizer's vocabulary, computed once (see `from_tokenizer`)."""

    name: str
    vocab_size: int  # len(tokenizer): added tokens included; may differ from the model config's vocab_size
    kind: str  # 'byte_level' | 'sentencepiece'
    marker: str | None  # the word-start marker the vocabulary uses: 'Ġ', '▁' (None: no marker)
    token_bytes: list[bytes]  # per id: the bytes of text it stands for (b'' for special tokens)
    nbytes: np.ndarray  # uint16 [vocab_size]: len(token_bytes[i])
    eos_id: int
    special_ids: np.ndarray  # int64, sorted: ids that stand for no text
    byte_fallback: np.ndarray  # bool [vocab_size]: SentencePiece <0xNN> tokens (emitted only for bytes
    #                            no other token covers; an exact match prefers the token that is emitted)
    pieces: list[str | None] = field(repr=False)  # the tokenizer's own spelling per id (diagnostics)

    @classmethod
    def from_tokenizer(cls, tok: PreTrainedTokenizerBase) -> TokenizerView:
        """The view of `tok`, cached per tokenizer object (tokenizers are cached per URI in fusion.hub)."""
        with _VIEW_LOCK:
            hit = _VIEWS.get(id(tok))
            if hit is not None and hit[0] is tok:
                return hit[1]
            view = build_view(tok)
            _VIEWS[id(tok)] = (tok, view)
            return view

    @classmethod
    def from_token_bytes(
        cls,
        name: str,
        token_bytes: list[bytes],
        eos_id: int,
        special_ids: list[int] | None = None,
        kind: str = "byte_level",
        byte_fallback: list[int] | None = None,
    ) -> TokenizerView:
        """A view of a hand-made vocabulary given as bytes (tests, small examples). eos_id is special."""
        size = len(token_bytes)
        special = sorted({eos_id, *(special_ids or [])})
        tb = [b"" if i in special else bytes(b) for i, b in enumerate(token_bytes)]
        fallback = np.zeros(size, dtype=bool)
        fallback[list(byte_fallback or [])] = True
        marker = {"byte_level": BPE_MARKER, "sentencepiece": SPM_MARKER}.get(kind)
        return cls(
            name=name,
            vocab_size=size,
            kind=kind,
            marker=marker,
            token_bytes=tb,
            nbytes=np.fromiter(map(len, tb), dtype=np.uint16, count=size),
            eos_id=eos_id,
            special_ids=np.array(special, dtype=np.int64),
            byte_fallback=fallback,
            pieces=[b.decode("latin-1") for b in token_bytes],
        )

    @cached_property
    def token_text(self) -> list[str]:
        """token_bytes as latin-1 str (one char per byte), the form rapidfuzz compares in C."""
        return list(map(methodcaller("decode", "latin-1"), self.token_bytes))

    def decode(self, ids: Any) -> bytes:
        """The bytes a sequence of ids stands for (special tokens contribute nothing)."""
        ids = np.asarray(ids).ravel()
        if ids.size == 0:
            return b""
        if ids.size == 1:
            return self.token_bytes[int(ids[0])]
        return b"".join(itemgetter(*ids.tolist())(self.token_bytes))

    def bytes_of(self, ids: Any) -> list[bytes]:
        """token_bytes of each id, in order."""
        ids = np.asarray(ids).ravel().tolist()
        if not ids:
            return []
        got = itemgetter(*ids)(self.token_bytes)
        return [got] if len(ids) == 1 else list(got)

    def fingerprint(self) -> str:
        """sha256 of the vocabulary as bytes + special ids: two views with equal fingerprints map alike."""
        return self._fingerprint

    @cached_property
    def _fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256()
        h.update(f"{self.kind}|{self.vocab_size}|{self.eos_id}|".encode())
        h.update(self.nbytes.astype("<u2").tobytes())
        h.update(b"".join(self.token_bytes))
        h.update(self.special_ids.astype("<i8").tobytes())
        h.update(np.packbits(self.byte_fallback).tobytes())
        return h.hexdigest()


_VIEWS: dict[int, tuple[Any, TokenizerView]] = {}
_VIEW_LOCK = threading.Lock()


def tokenizer_name(tok: Any) -> str:
    return str(getattr(tok, "name_or_path", "") or type(tok).__name__)


def id_pieces(tok: PreTrainedTokenizerBase) -> list[str | None]:
    """The piece (the tokenizer's own spelling) of every id 0..len(tok)-1; None for ids with no token."""
    vocab = tok.get_vocab()  # built in Rust for fast tokenizers; includes added tokens
    size = len(tok)
    pieces: list[str | None] = [None] * size
    strings = list(vocab)
    ids = np.fromiter(vocab.values(), dtype=np.int64, count=len(strings))
    keep = np.flatnonzero((ids >= 0) & (ids < size))
    if keep.size:
        at = ids[keep]
        ordered = itemgetter(*keep.tolist())(strings)
        ordered = [ordered] if keep.size == 1 else ordered
        if np.array_equal(at, np.arange(size)):
            return list(ordered)
        order = np.argsort(at, kind="stable")
        for i, s in zip(at[order].tolist(), itemgetter(*order.tolist())(ordered), strict=False):
            pieces[i] = s  # only for vocabularies with holes: rare, so a plain loop is fine
    return pieces


def detect_scheme(pieces: list[str | None], name: str) -> tuple[str, str | None]:
    """(kind, marker) of a vocabulary from its pieces alone (no table of tokenizer classes)."""
    present = set(pieces)
    alphabet_hits = len(_ALPHABET & present)
    fallback_hits = len(present.intersection(_BYTE_FALLBACK))
    words = list(filter(None, pieces))
    spm_starts = sum(map(methodcaller("startswith", SPM_MARKER), words))
    bpe_starts = sum(map(methodcaller("startswith", BPE_MARKER), words))
    # A byte-level BPE vocabulary holds (nearly) the whole 256-character byte alphabet as single tokens
    # (SmolLM2 drops 21 bytes that never occur in UTF-8 text) and 'Ġ' starts many words; a SentencePiece
    # one marks word starts with '▁' and falls back to <0xNN> for bytes.
    if alphabet_hits >= 200 and bpe_starts > spm_starts and bpe_starts >= len(words) // 100:
        return "byte_level", BPE_MARKER
    if spm_starts >= max(1, len(words) // 100) or fallback_hits >= 256:
        return "sentencepiece", SPM_MARKER if spm_starts else None
    raise TokenizerSchemeError(
        f"tokenizer {name}: cannot tell how tokens map to text: no 'Ġ' byte-level alphabet "
        f"({alphabet_hits}/256 byte characters) and no '▁' markers ({spm_starts} pieces) or <0xNN> byte "
        f"fallback ({fallback_hits}/256); use a byte-level BPE or SentencePiece tokenizer"
    )


def _special_ids(tok: PreTrainedTokenizerBase, size: int) -> np.ndarray:
    ids = set(tok.all_special_ids)
    for i, added in getattr(tok, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(int(i))
    arr = np.array(sorted(i for i in ids if i is not None and 0 <= i < size), dtype=np.int64)
    return arr


def _split_blob(blob: bytes, lengths: np.ndarray) -> list[bytes]:
    ends = np.cumsum(lengths)
    starts = ends - lengths
    return list(map(blob.__getitem__, map(slice, starts.tolist(), ends.tolist())))


def byte_level_bytes(pieces: list[str]) -> list[bytes]:
    """Bytes of byte-level BPE pieces: invert the byte alphabet over the joined vocabulary in one pass."""
    joined = "".join(pieces)
    if not set(joined) <= _ALPHABET:
        # Pieces outside the alphabet (rare: hand-added tokens) stand for their own UTF-8 text.
        return [
            p.translate(_UNICODE_TO_LATIN1).encode("latin-1") if set(p) <= _ALPHABET else p.encode()
            for p in pieces
        ]
    lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    return _split_blob(joined.translate(_UNICODE_TO_LATIN1).encode("latin-1"), lengths)


def sentencepiece_bytes(pieces: list[str]) -> list[bytes]:
    """Bytes of SentencePiece pieces: '▁' -> b' ', '<0xNN>' -> byte NN, the rest UTF-8."""
    out = list(map(str.encode, map(methodcaller("replace", SPM_MARKER, " "), pieces)))
    piece_to_id = dict(zip(pieces, range(len(pieces)), strict=True))  # built in C; 256 look-ups follow
    for piece, byte in _BYTE_FALLBACK.items():
        if piece in piece_to_id:
            out[piece_to_id[piece]] = bytes([byte])
    return out


def build_view(tok: PreTrainedTokenizerBase) -> TokenizerView:
    name = tokenizer_name(tok)
    size = len(tok)
    if tok.eos_token_id is None:
        raise TokenizerSchemeError(
            f"tokenizer {name}: has no EOS token; every document ends with EOS: load it with fusion.hub "
            "or set eos_token in its tokenizer_config.json"
        )
    pieces = id_pieces(tok)
    kind, marker = detect_scheme(pieces, name)
    special = _special_ids(tok, size)
    added = {int(i): t for i, t in getattr(tok, "added_tokens_decoder", {}).items() if 0 <= int(i) < size}
    # Added (non-special) tokens and holes are not spelled in the model's scheme: handle them apart.
    aside = sorted(set(added) | {i for i in special.tolist()} | _holes(pieces))
    plain = list(pieces)
    for i in aside:
        plain[i] = ""
    token_bytes = byte_level_bytes(plain) if kind == "byte_level" else sentencepiece_bytes(plain)
    special_set = set(special.tolist())
    for i in aside:
        token = added.get(i)
        text = getattr(token, "content", None)
        token_bytes[i] = b"" if i in special_set or text is None else text.encode()
    nbytes = np.fromiter(map(len, token_bytes), dtype=np.int64, count=size)
    if nbytes.max(initial=0) > np.iinfo(np.uint16).max:
        raise TokenizerSchemeError(f"tokenizer {name}: a token stands for more than 65535 bytes")
    fallback = np.zeros(size, dtype=bool)
    if kind == "sentencepiece":
        piece_to_id = dict(zip(pieces, range(size), strict=True))
        fallback[[piece_to_id[p] for p in _BYTE_FALLBACK if p in piece_to_id]] = True
    return TokenizerView(
        name=name,
        vocab_size=size,
        kind=kind,
        marker=marker,
        token_bytes=token_bytes,
        nbytes=nbytes.astype(np.uint16),
        eos_id=int(tok.eos_token_id),
        special_ids=special,
        byte_fallback=fallback,
        pieces=pieces,
    )


def _holes(pieces: list[str | None]) -> set[int]:
    if None not in pieces:
        return set()
    return {i for i, p in enumerate(pieces) if p is None}


def adds_bos_by_default(tok: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's own default encoding starts with BOS (Gemma, Llama-2: yes; GPT-2 family: no).

    Models trained that way are much worse without it (Gemma 3 270M on English prose here: 0.97 bits/byte
    without BOS, 0.76 with), so extraction follows each model's own convention unless told otherwise."""
    bos = tok.bos_token_id
    if bos is None:
        return False
    ids = tok("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def encode_documents(
    tok: PreTrainedTokenizerBase, texts: list[str], add_bos: bool = False
) -> list[np.ndarray]:
    """Token ids of each text + EOS, int32; BOS first only when `add_bos` (the reference never adds it).

    Text that merely looks like a special token ('<|endoftext|>', '</s>') is encoded as text: a document
    only ends where we append EOS."""
    if isinstance(texts, str):
        raise TypeError("encode_documents takes a list of texts, not one string")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"document {i}: expected text (str), got {type(text).__name__}")
        if not text:
            raise ValueError(f"document {i}: empty text; drop empty documents before encoding")
    if tok.eos_token_id is None:
        raise TokenizerSchemeError(f"tokenizer {tokenizer_name(tok)}: has no EOS token to end documents with")
    if add_bos and tok.bos_token_id is None:
        raise TokenizerSchemeError(
            f"tokenizer {tokenizer_name(tok)}: addBos is set but the tokenizer has no BOS token; "
            "set addBos: false"
        )
    if not texts:
        return []
    encoded = tok(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]
    eos = int(tok.eos_token_id)
    head = [int(tok.bos_token_id)] if add_bos else []
    out = []
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"document {i}: encodes to no tokens under {tokenizer_name(tok)}")
        arr = np.empty(len(head) + len(ids) + 1, dtype=np.int32)
        arr[: len(head)] = head
        arr[len(head) : -1] = ids
        arr[-1] = eos
        out.append(arr)
    return out
