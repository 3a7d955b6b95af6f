"""Source -> target vocabulary maps (MinED / EM), compared on the bytes tokens stand for.

Tokens are compared as their decoded bytes (`fusion.tokens`), held as latin-1 strings so that each byte is one
character: the reference's marker swap ('Ġhello' -> '▁hello') is implicit (both are b' hello'), and byte
tokens (SmolLM2's 'Ċ', Mistral's '<0x0A>') compare as the byte they are (defect 8 of docs/fusellm.md).

For every source id that is computed:
  special tokens   by role: source EOS -> target EOS; another special token -> the target special token of
                   the same spelling (e.g. '<|endoftext|>'), else unmapped (they stand for no text)
  exact            a target token with the same bytes -> that id; exact = True
  MinED            otherwise the target token at minimum Levenshtein distance over bytes
Ties (several targets with the same bytes, or at the same distance: the rule, not the exception, defect 9)
are broken by a fixed candidate order, so the map is reproducible across loads: tokens the target tokenizer
emits before SentencePiece byte-fallback tokens ('a' before '<0x61>', which Mistral never emits for 'a';
'<0x0A>' still wins for b'\n', which only a byte token spells), then the LOWEST target id.
  EM               no exact match -> -1
Tokens that stand for no text (empty bytes) are never mapped to an arbitrary token, and never chosen.

The distance matrix is computed by rapidfuzz (C++, bit-parallel Levenshtein) in chunks of queries; only the
source ids that occur (lazy mode: `src_ids`) need computing (defect 6). The whole SmolLM2 -> Mistral map
(49k x 32k) takes seconds, against ~830 s for the reference (defect 10).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusion.atomic import write_atomic
from fusion.tokens import TokenizerView

METHODS = ("mined", "em")
# Query rows per rapidfuzz call: bounds the int32 distance block (rows x target vocab) to ~128 MB.
_CHUNK_CELLS = 1 << 25


class StaleVocabMapError(ValueError):
    """A saved vocabulary map that was built for other tokenizers."""


@dataclass(frozen=True, eq=False)
class VocabMap:
    """ids[s] = the target id source id s maps to (-1: unmapped or not computed)."""

    ids: np.ndarray  # int32 [src vocab_size]
    exact: np.ndarray  # bool: same bytes (or a special token mapped by role)
    computed: np.ndarray  # bool: this source id was looked at (lazy maps compute only ids that occur)
    distance: np.ndarray  # int32: Levenshtein distance in bytes to the chosen target (-1: none)
    method: str
    src_fingerprint: str
    tgt_fingerprint: str

    def check(self, src: TokenizerView, tgt: TokenizerView, where: str = "vocabulary map") -> None:
        """Raise StaleVocabMapError unless this map was built for exactly these two vocabularies."""
        if self.src_fingerprint != src.fingerprint() or len(self.ids) != src.vocab_size:
            raise StaleVocabMapError(
                f"{where}: built for another source vocabulary than {src.name}; delete it to rebuild"
            )
        if self.tgt_fingerprint != tgt.fingerprint():
            raise StaleVocabMapError(
                f"{where}: built for another target vocabulary than {tgt.name}; delete it to rebuild"
            )

    def missing(self, src_ids: np.ndarray) -> np.ndarray:
        """The ids among src_ids (unique, sorted) that this map has not computed."""
        src_ids = _unique_ids(src_ids, len(self.ids), "src_ids")
        return src_ids[~self.computed[src_ids]]

    def lookup(self, src_ids: np.ndarray, exact_only: bool = False) -> np.ndarray:
        """Target ids for an array of source ids (any shape; negative ids stay -1)."""
        src_ids = np.asarray(src_ids)
        valid = src_ids >= 0
        safe = np.where(valid, src_ids, 0)
        out = self.ids[safe]
        if exact_only:
            out = np.where(self.exact[safe], out, -1)
        return np.where(valid, out, -1).astype(np.int32)

    def save(self, path: str | os.PathLike) -> None:
        """Write an .npz atomically (temporary file in the same folder, fsync, rename)."""
        write_atomic(
            path,
            lambda f: np.savez(
                f,
                ids=self.ids,
                exact=self.exact,
                computed=self.computed,
                distance=self.distance,
                method=np.array(self.method),
                src_fingerprint=np.array(self.src_fingerprint),
                tgt_fingerprint=np.array(self.tgt_fingerprint),
            ),
        )

    @classmethod
    def load(
        cls, path: str | os.PathLike, src: TokenizerView | None = None, tgt: TokenizerView | None = None
    ) -> VocabMap:
        """Read a saved map; with both views given, check it was built for them (StaleVocabMapError)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: vocabulary map is missing; build it with build_vocab_map")
        try:
            with np.load(path, allow_pickle=False) as z:
                vmap = cls(
                    ids=z["ids"].astype(np.int32),
                    exact=z["exact"].astype(bool),
                    computed=z["computed"].astype(bool),
                    distance=z["distance"].astype(np.int32),
                    method=str(z["method"]),
                    src_fingerprint=str(z["src_fingerprint"]),
                    tgt_fingerprint=str(z["tgt_fingerprint"]),
                )
        except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
            raise StaleVocabMapError(
                f"{path}: not a readable vocabulary map ({err}); delete it to rebuild"
            ) from None
        if src is not None and tgt is not None:
            vmap.check(src, tgt, str(path))
        return vmap


def _unique_ids(ids: np.ndarray, size: int, what: str) -> np.ndarray:
    ids = np.unique(np.asarray(ids, dtype=np.int64).ravel())
    ids = ids[ids >= 0]  # -1 is the empty-slot marker of top-k lists
    if ids.size and ids[-1] >= size:
        raise ValueError(f"{what}: id {int(ids[-1])} is outside the source vocabulary of {size} tokens")
    return ids


def target_candidates(tgt: TokenizerView) -> np.ndarray:
    """Target ids a text token may map to (those standing for some text), in tie-break order:
    emitted tokens by ascending id, then byte-fallback tokens by ascending id."""
    ok = tgt.nbytes > 0
    ok[tgt.special_ids] = False
    return np.concatenate([np.flatnonzero(ok & ~tgt.byte_fallback), np.flatnonzero(ok & tgt.byte_fallback)])


def exact_index(tgt: TokenizerView, candidates: np.ndarray) -> dict[str, int]:
    """text -> the first candidate with that text (built in C: reversed order lets the first one win)."""
    texts = tgt.token_text
    rev = candidates[::-1].tolist()
    return dict(zip(map(texts.__getitem__, rev), rev, strict=True))


def build_vocab_map(
    src: TokenizerView,
    tgt: TokenizerView,
    method: str = "mined",
    src_ids: np.ndarray | None = None,
    workers: int = -1,
) -> VocabMap:
    """Map source ids onto the target vocabulary; all ids, or only `src_ids` (lazy; others -1)."""
    if method not in METHODS:
        raise ValueError(f"alignment method {method!r}: expected one of {METHODS}")
    size = src.vocab_size
    ids = np.full(size, -1, dtype=np.int32)
    exact = np.zeros(size, dtype=bool)
    computed = np.zeros(size, dtype=bool)
    distance = np.full(size, -1, dtype=np.int32)
    vmap = VocabMap(ids, exact, computed, distance, method, src.fingerprint(), tgt.fingerprint())
    todo = np.arange(size) if src_ids is None else _unique_ids(src_ids, size, "src_ids")
    _fill(vmap, src, tgt, todo, workers)
    return vmap


def extend_vocab_map(
    vmap: VocabMap, src: TokenizerView, tgt: TokenizerView, src_ids: np.ndarray, workers: int = -1
) -> VocabMap:
    """A copy of a lazy map that also covers `src_ids` (only the missing ones are computed)."""
    vmap.check(src, tgt)
    out = VocabMap(
        vmap.ids.copy(),
        vmap.exact.copy(),
        vmap.computed.copy(),
        vmap.distance.copy(),
        vmap.method,
        vmap.src_fingerprint,
        vmap.tgt_fingerprint,
    )
    _fill(out, src, tgt, vmap.missing(src_ids), workers)
    return out


def _fill(vmap: VocabMap, src: TokenizerView, tgt: TokenizerView, todo: np.ndarray, workers: int) -> None:
    """Compute vmap's entries for source ids `todo` in place."""
    vmap.computed[todo] = True
    special = np.zeros(src.vocab_size, dtype=bool)
    special[src.special_ids] = True
    _map_specials(vmap, src, tgt, todo[special[todo]])
    text_ids = todo[~special[todo] & (src.nbytes[todo] > 0)]  # empty, non-special tokens stay unmapped
    candidates = target_candidates(tgt)
    index = exact_index(tgt, candidates)
    queries = list(map(src.token_text.__getitem__, text_ids.tolist()))
    hits = np.fromiter(map(index.get, queries, [-1] * len(queries)), dtype=np.int64, count=len(queries))
    found = hits >= 0
    vmap.ids[text_ids[found]] = hits[found]
    vmap.exact[text_ids[found]] = True
    vmap.distance[text_ids[found]] = 0
    if vmap.method == "mined" and (~found).any():
        rest = text_ids[~found]
        best, dist = nearest_targets(
            list(map(queries.__getitem__, np.flatnonzero(~found).tolist())),
            list(map(tgt.token_text.__getitem__, candidates.tolist())),
            workers,
        )
        vmap.ids[rest] = candidates[best]
        vmap.distance[rest] = dist


def nearest_targets(
    queries: list[str], choices: list[str], workers: int = -1
) -> tuple[np.ndarray, np.ndarray]:
    """For each query the index of the choice at minimum Levenshtein distance (first = lowest on ties)."""
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    best = np.empty(len(queries), dtype=np.int64)
    dist = np.empty(len(queries), dtype=np.int32)
    step = max(1, _CHUNK_CELLS // max(1, len(choices)))
    for lo in range(0, len(queries), step):
        block = process.cdist(
            queries[lo : lo + step], choices, scorer=Levenshtein.distance, dtype=np.int32, workers=workers
        )
        arg = block.argmin(axis=1)  # numpy returns the first minimum: the first candidate wins ties
        best[lo : lo + step] = arg
        dist[lo : lo + step] = block[np.arange(len(arg)), arg]
    return best, dist


def _map_specials(vmap: VocabMap, src: TokenizerView, tgt: TokenizerView, ids: np.ndarray) -> None:
    """Special tokens stand for no text: map them by role (EOS) or by identical spelling, else -1."""
    if not ids.size:
        return
    tgt_special = {tgt.pieces[i]: i for i in tgt.special_ids.tolist() if tgt.pieces[i] is not None}
    for i in ids.tolist():  # a handful of special tokens per tokenizer
        j = tgt.eos_id if i == src.eos_id else tgt_special.get(src.pieces[i], -1)
        vmap.ids[i] = j
        vmap.exact[i] = j >= 0
        vmap.distance[i] = 0 if j >= 0 else -1
