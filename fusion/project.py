"""Projection of a source's next-token distribution onto the target vocabulary by what tokens spell.

Each source id goes to the target token the target tokenizer would emit FIRST for that token's text:
  text             the source token's bytes, valid UTF-8: encoded by the target's own fast tokenizer
                   (Rust, one batch for all ids) with its dummy prefix disabled, because a continuation is
                   not a document start: SmolLM2 'Ġpickle' (b' pickle') -> Mistral '▁pick'; 'le' -> 'le'
  partial UTF-8    (byte-level pieces such as 'ä½' = b'\\xe4\\xbd', SentencePiece <0xE4>): the valid UTF-8
                   head when there is one (b' \\xe2' -> what the target emits for ' '), else the target's
                   byte token for the first byte (a byte-level single-byte token, SentencePiece <0xNN>); a
                   target without one drops the entry
  EOS              -> the target's EOS. Both mean "the document ends here", and exact pairing hands the row of
                   a document's last text token (whose gold next token is EOS) the source's row at the same
                   end of text, so this is the one special token with a right answer
  other specials   (BOS, chat markers, padding, ids that stand for no text) dropped: they are not text
Source entries that land on the same target id have their probabilities SUMMED (`sum_duplicates`):
' pick' and ' pickle' both start with Mistral '▁pick', and the target's '▁pick' is as likely as both together.

Document starts (modes). A SentencePiece tokenizer that prepends a dummy space ('Hello' -> '▁Hello') behaves
differently before its first text byte. Each pairing row is in one of four modes, 2 * src_at_start +
tgt_at_start, where "at start" means that tokenizer's dummy space is still pending at that row (a BOS row of
a document whose first token carries the dummy):
  source at start  its candidates spell the dummy (' Hello' for text 'Hello'): one leading space is removed
  target at start  the target encodes as at a document start, dummy included (text '1' -> '▁' first)
Modes that cannot differ (no dummy on that side) share one encoding.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import zipfile
from dataclasses import dataclass
from functools import partial
from operator import attrgetter, itemgetter, methodcaller
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fusion.atomic import write_atomic
from fusion.tokens import TokenizerSchemeError, TokenizerView, tokenizer_name
from fusion.vocab import exact_index, target_candidates

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

MODES = 4  # 2 * src_at_start + tgt_at_start

# How a source id was projected (mode 0); kept for diagnostics (dropped mass by cause).
NOT_COMPUTED, TEXT, BYTE, EOS, SPECIAL, NO_BYTE_TOKEN, EMPTY, NO_TARGET = range(8)
OUTCOMES = ("not_computed", "text", "byte", "eos", "special", "no_byte_token", "empty", "no_target")

_INVALID = re.compile("[\udc80-\udcff]")  # bytes that are not UTF-8, after decode(..., 'surrogateescape')


class ProjectionError(ValueError):
    """A tokenizer or saved projection that cannot be used; the message names the fix."""


class StaleProjectionError(ProjectionError):
    """A saved projection built for other tokenizers."""


def mode_index(src_at_start: Any, tgt_at_start: Any) -> Any:
    return 2 * np.asarray(src_at_start, dtype=np.int64) + np.asarray(tgt_at_start, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class Projection:
    """ids[mode, s] = the target id source id s projects to in that mode (-1: dropped or not computed)."""

    ids: np.ndarray  # int32 [MODES, src vocab_size]
    outcome: np.ndarray  # uint8 [src vocab_size]: OUTCOMES code of mode 0; NOT_COMPUTED = 0
    src_fingerprint: str
    tgt_fingerprint: str
    tgt_rules: str  # target_rules(): sha256 of how the target encodes (normalizer ... added tokens)
    src_dummy: bool  # the source tokenizer prepends a dummy space at a document start
    tgt_dummy: bool

    @property
    def computed(self) -> np.ndarray:
        return self.outcome != NOT_COMPUTED

    def missing(self, src_ids: np.ndarray) -> np.ndarray:
        """The ids among src_ids (unique, sorted; -1 ignored) that this projection has not computed."""
        ids = _unique_ids(src_ids, self.ids.shape[1])
        return ids[~self.computed[ids]]

    def lookup(self, src_ids: np.ndarray, modes: np.ndarray | int = 0) -> np.ndarray:
        """Target ids for source ids [R, k] (negative: empty slot -> -1) in per-row modes [R] (or one)."""
        src_ids = np.asarray(src_ids)
        safe = np.where(src_ids >= 0, src_ids, 0)
        modes = np.asarray(modes, dtype=np.int64)
        rows = modes[:, None] if modes.ndim == 1 and src_ids.ndim == 2 else modes
        return np.where(src_ids >= 0, self.ids[rows, safe], -1).astype(np.int32)

    def check(
        self, src: TokenizerView, tgt: TokenizerView, where: str = "projection", tgt_rules: str | None = None
    ) -> None:
        """Raise StaleProjectionError unless built for exactly these vocabularies (and target rules)."""
        if self.src_fingerprint != src.fingerprint() or self.ids.shape[1] != src.vocab_size:
            raise StaleProjectionError(
                f"{where}: built for another source vocabulary than {src.name}; delete it to rebuild"
            )
        if self.tgt_fingerprint != tgt.fingerprint() or (
            tgt_rules is not None and tgt_rules != self.tgt_rules
        ):
            raise StaleProjectionError(
                f"{where}: built for another target tokenizer than {tgt.name}; delete it to rebuild"
            )

    def save(self, path: str | os.PathLike) -> None:
        """Write an .npz atomically (fusion.atomic)."""
        write_atomic(
            path,
            lambda f: np.savez(
                f,
                ids=self.ids,
                outcome=self.outcome,
                src_fingerprint=np.array(self.src_fingerprint),
                tgt_fingerprint=np.array(self.tgt_fingerprint),
                tgt_rules=np.array(self.tgt_rules),
                src_dummy=np.array(self.src_dummy),
                tgt_dummy=np.array(self.tgt_dummy),
            ),
        )

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        src: TokenizerView | None = None,
        tgt: TokenizerView | None = None,
        tgt_rules: str | None = None,
    ) -> Projection:
        """Read a saved projection; with both views given, check it was built for them (and, given
        tgt_rules = target_rules(target tokenizer), for the target's encoding rules too)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: projection is missing; build it with build_projection")
        try:
            with np.load(path, allow_pickle=False) as z:
                proj = cls(
                    ids=z["ids"].astype(np.int32),
                    outcome=z["outcome"].astype(np.uint8),
                    src_fingerprint=str(z["src_fingerprint"]),
                    tgt_fingerprint=str(z["tgt_fingerprint"]),
                    tgt_rules=str(z["tgt_rules"]),
                    src_dummy=bool(z["src_dummy"]),
                    tgt_dummy=bool(z["tgt_dummy"]),
                )
        except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
            raise StaleProjectionError(
                f"{path}: not a readable projection ({err}); delete it to rebuild"
            ) from None
        if proj.ids.ndim != 2 or proj.ids.shape[0] != MODES or proj.outcome.shape != proj.ids.shape[1:]:
            raise StaleProjectionError(
                f"{path}: projection arrays have the wrong shape; delete it to rebuild"
            )
        if src is not None and tgt is not None:
            proj.check(src, tgt, str(path), tgt_rules)
        return proj


def _unique_ids(ids: np.ndarray, size: int) -> np.ndarray:
    ids = np.unique(np.asarray(ids, dtype=np.int64).ravel())
    ids = ids[ids >= 0]
    if ids.size and ids[-1] >= size:
        raise ValueError(f"src_ids: id {int(ids[-1])} is outside the source vocabulary of {size} tokens")
    return ids


# --------------------------------------------------------------------------------------------------
# The target's encoders


@dataclass(frozen=True)
class Encoders:
    """A tokenizer's Rust backend twice: as at a document start (its own settings) and inside a document
    (dummy prefix disabled); both encode special-token look-alikes as text, like encode_documents."""

    start: Tokenizer
    inside: Tokenizer
    dummy: bool  # `start` prepends a dummy space
    rules: str  # target_rules()


def _backend(tok: PreTrainedTokenizerBase) -> Tokenizer:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ProjectionError(
            f"tokenizer {tokenizer_name(tok)}: projection needs a fast (Rust-backed) tokenizer; "
            "load it with fusion.hub.load_tokenizer"
        )
    return backend


def _without_dummy_prefix(node: Any) -> Any:
    """A copy of a normalizer / pre-tokenizer JSON node that never prepends a space marker."""
    if isinstance(node, list):
        return [_without_dummy_prefix(n) for n in node if not _is_prepend(n)]
    if not isinstance(node, dict):
        return node
    out = {k: _without_dummy_prefix(v) for k, v in node.items()}
    if out.get("type") == "Metaspace":
        if "prepend_scheme" in out:
            out["prepend_scheme"] = "never"
        if "add_prefix_space" in out:
            out["add_prefix_space"] = False
    elif out.get("type") == "ByteLevel" and "add_prefix_space" in out:
        out["add_prefix_space"] = False
    return out


def _is_prepend(node: Any) -> bool:
    return isinstance(node, dict) and node.get("type") == "Prepend"


def _components_without_dummy(backend: Tokenizer) -> tuple[Any, Any]:
    """`backend`'s normalizer and pre-tokenizer with their dummy prefix removed, rebuilt from their JSON
    (components serialise as JSON; a tokenizer with no vocabulary deserialises them)."""
    from tokenizers import Tokenizer

    states = [
        None if c is None else json.loads(c.__getstate__())
        for c in (backend.normalizer, backend.pre_tokenizer)
    ]
    normalizer, pre_tokenizer = (None if _is_prepend(s) else _without_dummy_prefix(s) for s in states)
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": {}, "unk_token": "<unk>"},
    }
    shell = Tokenizer.from_str(json.dumps(spec))
    return shell.normalizer, shell.pre_tokenizer


def _encoder(backend: Tokenizer, normalizer: Any, pre_tokenizer: Any) -> Tokenizer:
    """A tokenizer sharing `backend`'s model (no copy of the vocabulary) with the given components and the
    same added tokens; special-token look-alikes are encoded as text, as encode_documents does."""
    from tokenizers import Tokenizer

    out = Tokenizer(backend.model)
    out.normalizer, out.pre_tokenizer = normalizer, pre_tokenizer
    added = sorted(backend.get_added_tokens_decoder().items())
    # In id order, one call per run of equally special tokens (one call per token rebuilds the matcher each
    # time: minutes for Gemma's thousands of added tokens), so that tokens outside the model keep their ids.
    for special, run in itertools.groupby(added, key=lambda item: item[1].special):
        tokens = [token for _, token in run]
        (out.add_special_tokens if special else out.add_tokens)(tokens)
    moved = [(i, t.content) for i, t in added if out.token_to_id(t.content) != i]
    if moved:
        raise ProjectionError(f"added tokens {moved[:3]}: cannot rebuild them at their ids")
    out.encode_special_tokens = True
    return out


def encoders(tok: PreTrainedTokenizerBase, view: TokenizerView) -> Encoders:
    """The start/inside encoders of `tok`; raises ProjectionError when its dummy prefix cannot be disabled."""
    backend = _backend(tok)
    start = _encoder(backend, backend.normalizer, backend.pre_tokenizer)
    inside = _encoder(backend, *_components_without_dummy(backend))
    spelled = view.decode(inside.encode(_PROBE, add_special_tokens=False).ids)
    if spelled != _PROBE.encode():
        raise ProjectionError(
            f"tokenizer {view.name}: cannot encode text inside a document: {_PROBE!r} encodes to "
            f"{spelled!r} even with its dummy prefix disabled; use the mined or em alignment method"
        )
    return Encoders(start, inside, dummy=has_dummy_prefix(tok, view), rules=target_rules(tok))


_PROBE = "a"


def has_dummy_prefix(tok: PreTrainedTokenizerBase, view: TokenizerView) -> bool:
    """Whether `tok` writes a space before a document's text ('a' -> '▁a': SentencePiece's dummy prefix)."""
    return view.decode(_backend(tok).encode(_PROBE, add_special_tokens=False).ids) == b" " + _PROBE.encode()


def target_rules(tok: PreTrainedTokenizerBase) -> str:
    """sha256 of how `tok` encodes: normalizer, pre-tokenizer, model (vocabulary, merges), added tokens."""
    backend = _backend(tok)
    h = hashlib.sha256()
    for component in (backend.normalizer, backend.pre_tokenizer, backend.model):
        h.update(b"-" if component is None else component.__getstate__())
    h.update(repr(sorted(backend.get_added_tokens_decoder().items())).encode())
    return h.hexdigest()


def _take(seq: list[Any], idx: np.ndarray) -> list[Any]:
    """seq[i] for each i of idx, gathered in C."""
    return list(map(seq.__getitem__, idx.tolist()))


def byte_tokens(tgt: TokenizerView) -> np.ndarray:
    """int64 [256]: the target token standing for exactly that one byte (-1: none); emitted tokens first."""
    cands = target_candidates(tgt)
    single = cands[tgt.nbytes[cands] == 1]
    index = exact_index(tgt, single)
    out = np.full(256, -1, dtype=np.int64)
    for text, i in index.items():  # at most 256 entries
        out[ord(text)] = i
    return out


# --------------------------------------------------------------------------------------------------
# Building


def build_projection(
    src_tok: PreTrainedTokenizerBase, tgt_tok: PreTrainedTokenizerBase, src_ids: np.ndarray | None = None
) -> Projection:
    """Project source ids onto the target vocabulary: all ids, or only `src_ids` (lazy; others -1)."""
    src, tgt = TokenizerView.from_tokenizer(src_tok), TokenizerView.from_tokenizer(tgt_tok)
    tgt_enc = encoders(tgt_tok, tgt)
    proj = Projection(
        ids=np.full((MODES, src.vocab_size), -1, dtype=np.int32),
        outcome=np.zeros(src.vocab_size, dtype=np.uint8),
        src_fingerprint=src.fingerprint(),
        tgt_fingerprint=tgt.fingerprint(),
        tgt_rules=tgt_enc.rules,
        src_dummy=has_dummy_prefix(src_tok, src),
        tgt_dummy=tgt_enc.dummy,
    )
    todo = np.arange(src.vocab_size) if src_ids is None else _unique_ids(src_ids, src.vocab_size)
    _fill(proj, src, tgt, tgt_enc, todo)
    return proj


def extend_projection(
    proj: Projection, src_tok: PreTrainedTokenizerBase, tgt_tok: PreTrainedTokenizerBase, src_ids: np.ndarray
) -> Projection:
    """A copy of a lazy projection that also covers `src_ids` (only the missing ones are computed)."""
    src, tgt = TokenizerView.from_tokenizer(src_tok), TokenizerView.from_tokenizer(tgt_tok)
    tgt_enc = encoders(tgt_tok, tgt)
    proj.check(src, tgt, tgt_rules=tgt_enc.rules)
    out = Projection(
        proj.ids.copy(),
        proj.outcome.copy(),
        proj.src_fingerprint,
        proj.tgt_fingerprint,
        proj.tgt_rules,
        proj.src_dummy,
        proj.tgt_dummy,
    )
    _fill(out, src, tgt, tgt_enc, proj.missing(src_ids))
    return out


def ensure_projection(
    cached: Projection | None,
    src_tok: PreTrainedTokenizerBase,
    tgt_tok: PreTrainedTokenizerBase,
    src_ids: np.ndarray,
) -> tuple[Projection, str]:
    """A projection covering `src_ids`: `cached` reused or extended when it was built for these tokenizers,
    else built anew (a stale cache is a cache miss). Returns it and 'reused' | 'extended' | 'built'."""
    if cached is not None:
        src, tgt = TokenizerView.from_tokenizer(src_tok), TokenizerView.from_tokenizer(tgt_tok)
        try:
            cached.check(src, tgt, tgt_rules=target_rules(tgt_tok))
        except StaleProjectionError:
            cached = None
    if cached is None:
        return build_projection(src_tok, tgt_tok, src_ids), "built"
    if cached.missing(src_ids).size:
        return extend_projection(cached, src_tok, tgt_tok, src_ids), "extended"
    return cached, "reused"


def _fill(proj: Projection, src: TokenizerView, tgt: TokenizerView, enc: Encoders, todo: np.ndarray) -> None:
    """Compute proj's entries for source ids `todo` in place, in every mode."""
    if not todo.size:
        return
    special = np.zeros(src.vocab_size, dtype=bool)
    special[src.special_ids] = True
    outcome = np.where(special[todo], SPECIAL, np.where(src.nbytes[todo] > 0, TEXT, EMPTY)).astype(np.uint8)
    outcome[todo == src.eos_id] = EOS
    proj.outcome[todo] = outcome
    proj.ids[:, todo[outcome == EOS]] = tgt.eos_id
    text_ids = todo[outcome == TEXT]
    as_is = src.bytes_of(text_ids)
    stripped = list(map(methodcaller("removeprefix", b" "), as_is)) if proj.src_dummy else as_is
    bytes_table = byte_tokens(tgt)
    done: dict[tuple[bool, bool], np.ndarray] = {}
    for mode in range(MODES):
        src_start, tgt_start = bool(mode & 2) and proj.src_dummy, bool(mode & 1) and proj.tgt_dummy
        key = (src_start, tgt_start)
        if key not in done:
            encoder = enc.start if tgt_start else enc.inside
            done[key], how = project_bytes(stripped if src_start else as_is, encoder, tgt, bytes_table)
            if mode == 0:
                proj.outcome[text_ids] = how
        proj.ids[mode, text_ids] = done[key]


def project_bytes(
    texts: list[bytes], encoder: Tokenizer, tgt: TokenizerView, bytes_table: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The target id each text starts with (int32, -1: none) and how it was found (uint8 OUTCOMES code)."""
    n = len(texts)
    ids = np.full(n, -1, dtype=np.int64)
    how = np.full(n, NO_TARGET, dtype=np.uint8)
    if not n:
        return ids.astype(np.int32), how
    decoded = list(map(methodcaller("decode", "utf-8", "surrogateescape"), texts))
    heads = list(map(itemgetter(0), map(partial(_INVALID.split, maxsplit=1), decoded)))
    has_head = np.fromiter(map(len, heads), dtype=np.int64, count=n) > 0
    # Text with a valid UTF-8 head: the first token the target emits for it.
    todo = np.flatnonzero(has_head)
    if todo.size:
        batch = encoder.encode_batch_fast(_take(heads, todo), add_special_tokens=False)
        first = np.fromiter(
            map(next, map(iter, map(attrgetter("ids"), batch)), itertools.repeat(-1)),
            dtype=np.int64,
            count=todo.size,
        )
        ids[todo], how[todo] = first, np.where(first >= 0, TEXT, NO_TARGET)
    # Text starting with a partial character: the target's token for that single byte.
    rest = np.flatnonzero(~has_head & (np.fromiter(map(len, texts), dtype=np.int64, count=n) > 0))
    if rest.size:
        lead = np.frombuffer(bytes(map(itemgetter(0), _take(texts, rest))), dtype=np.uint8)
        ids[rest] = bytes_table[lead]
        how[rest] = np.where(ids[rest] >= 0, BYTE, NO_BYTE_TOKEN)
    how[~has_head & (ids < 0) & (how == NO_TARGET)] = EMPTY
    if (ids >= tgt.vocab_size).any():
        raise TokenizerSchemeError(f"tokenizer {tgt.name}: encoded an id beyond its {tgt.vocab_size} tokens")
    # A first token that stands for no text (an <unk> of a tokenizer without byte fallback) is no projection.
    special = np.zeros(tgt.vocab_size, dtype=bool)
    special[tgt.special_ids] = True
    bad = (ids >= 0) & special[np.maximum(ids, 0)]
    ids[bad], how[bad] = -1, NO_TARGET
    return ids.astype(np.int32), how


# --------------------------------------------------------------------------------------------------
# Top-k rows


_ROWS_PER_BLOCK = 1 << 16  # rows merged at a time: the [rows, k, k] masks stay <= 64 MB (k <= 32)


def sum_duplicates(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[R, k] target ids (-1: dropped) and log-probs -> the same shape with entries of one id per row
    merged by SUMMING their probabilities (logsumexp), best first (ties: the source's order), padded
    -1 / -inf.
    NaN and -inf log-probs (probability 0) are no entry. Returns (int32 ids, float32 log-probs)."""
    ids = np.asarray(ids)
    out_ids = np.full(ids.shape, -1, dtype=np.int32)
    out_lp = np.full(ids.shape, -np.inf, dtype=np.float32)
    for lo in range(0, ids.shape[0], _ROWS_PER_BLOCK):
        hi = lo + _ROWS_PER_BLOCK
        out_ids[lo:hi], out_lp[lo:hi] = _sum_block(ids[lo:hi], np.asarray(logprobs[lo:hi]))
    return out_ids, out_lp


def _sum_block(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lp = logprobs.astype(np.float64)
    live = (ids >= 0) & np.isfinite(lp)
    p = np.where(live, np.exp(np.where(live, lp, 0.0)), 0.0)
    ids = np.where(live, ids, -1).astype(np.int64)
    same = (ids[:, :, None] == ids[:, None, :]) & live[:, None, :]  # [R, k, k]; dead entries are -1
    total = np.einsum("rjl,rl->rj", same, p)  # each entry: the summed probability of its id in the row
    first = np.argmax(same, axis=2)  # the first entry with the same id (itself, unless a duplicate)
    keep = live & (first == np.arange(ids.shape[1])) & (total > 0)
    # Kept entries, most probable first; equal probabilities keep the source's order.
    order = np.argsort(np.where(keep, -total, np.inf), axis=1, kind="stable")
    ids, total, keep = (np.take_along_axis(a, order, axis=1) for a in (ids, total, keep))
    with np.errstate(divide="ignore"):
        lp_out = np.minimum(np.log(total), 0.0)  # fp16 inputs can sum to a hair above 1
    return np.where(keep, ids, -1).astype(np.int32), np.where(keep, lp_out, -np.inf).astype(np.float32)
