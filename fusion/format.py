"""Compact, checksummed, memory-mappable artifact shards.

A shard is one safetensors file (a C/Rust-backed, memory-mappable container with a JSON header) holding
ragged per-document data as flat arrays plus `doc_offsets`. Nothing is padded to a fixed length; token ids
are uint16 when the vocabulary fits, else int32; values are 16-bit. Writes go to a temporary file in the same
folder, are fsynced and renamed, so a reader sees a whole shard or none. Readers check the header, the
arrays each kind of shard must have, their dtypes and shapes, and (when given) the sha256 recorded in the
stage manifest, and name the file and the fix when anything is off.

Kinds and their arrays (N = tokens in the shard, D = documents, k = top-k, K = fused width):

extract  (one model's predictions on its own tokenization; row t predicts token t+1 of its document;
          the last row of each document predicts nothing: gold_logprob 0, excluded everywhere)
  doc_index int64 [D]          document ids in the prepared corpus (join key across models)
  doc_offsets int64 [D+1]      token offsets of documents
  input_ids uint16|int32 [N]   the model's tokens
  token_nbytes uint16 [N]      bytes of text each token stands for (0 for special tokens)
  topk_ids uint16|int32 [N,k]  top-k next-token ids, best first
  topk_logprobs float16 [N,k]  their log-probabilities under the full softmax
  gold_logprob float16 [N]     log-probability of the actual next token
  doc_nll float32 [D]          sum of -log p(gold) over predicted positions (fp32 accumulation)
  doc_pred_nbytes int64 [D]    bytes of text those predicted tokens stand for (bits/byte = nll/ln2/bytes)
  doc_n_pred int32 [D]         number of predicted positions

aligned  (one source's predictions mapped onto the target's positions and vocabulary)
  doc_index, doc_offsets       as the target's extract shard
  topk_ids int32 [N,k]         target vocab ids, -1 where empty (duplicates merged, unmapped dropped)
  topk_logprobs float16 [N,k]  -inf where empty
  aligned uint8 [N]            1: accepted 1:1 pair; 0: fallback, one-hot on the next gold target token
  gold_logprob float16 [N]     the source's log p(gold) at the aligned position (NaN when not aligned)
  gold_nbytes uint16 [N]       bytes of the source token that was predicted there (0 when not aligned)
  doc_nll, doc_pred_nbytes, doc_n_pred   the source's own per-document figures (sequence-level CE)

fused  (training targets on the target's tokenization)
  doc_index, doc_offsets, input_ids      as the target's extract shard
  target_ids int32 [N,K]       fused distribution's ids, -1 where empty
  target_probs float16 [N,K]   its probabilities (rows sum to 1 over non-empty entries; 0 where empty)
  choice int8 [D] or [N]       MinCE: index of the candidate picked (0 = target); AvgCE: -1

Top-k id arrays (topk_ids, target_ids) are stored packed when that saves room: each id + 1 (so an empty
entry, -1, is 0) in the fewest bits that hold the shard's largest id, row by row (uint8 [N, ceil(k * bits /
8)]; 18-19 bits for Gemma's 262k vocabulary instead of int32's 32, 16 for SmolLM2's 49k in the aligned and
fused shards), the header recording bits, width and dtype. Readers unpack to the dtype above, so no
consumer sees the difference; shards written before (format 1, unpacked) read as before.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fusion.atomic import atomic_path

FORMAT_VERSION = "2"  # 2: top-k ids packed ("packed" in the header); 1 (unpacked) is read as well
_HEADER_KEY = "fusionrun"  # safetensors metadata key: {"kind", "format_version", "meta", "packed"} as JSON
PACKABLE = ("topk_ids", "target_ids")  # 2-D id arrays, stored in the bits their largest id needs
_PACK_ENTRIES = 1 << 20  # ids (un)packed at a time: bounds the temporary bit arrays (32 B an id)

# name -> (allowed dtypes, ndim, leading dimension: "N" tokens, "D" documents, "D+1")
_COMMON = {
    "doc_index": ({"int64"}, 1, "D"),
    "doc_offsets": ({"int64"}, 1, "D+1"),
}
_DOC_CE = {
    "doc_nll": ({"float32"}, 1, "D"),
    "doc_pred_nbytes": ({"int64"}, 1, "D"),
    "doc_n_pred": ({"int32"}, 1, "D"),
}
SCHEMAS: dict[str, dict[str, tuple[set[str], int, str]]] = {
    "extract": {
        **_COMMON,
        **_DOC_CE,
        "input_ids": ({"uint16", "int32"}, 1, "N"),
        "token_nbytes": ({"uint16"}, 1, "N"),
        "topk_ids": ({"uint16", "int32"}, 2, "N"),
        "topk_logprobs": ({"float16"}, 2, "N"),
        "gold_logprob": ({"float16"}, 1, "N"),
    },
    "aligned": {
        **_COMMON,
        **_DOC_CE,
        "topk_ids": ({"int32"}, 2, "N"),
        "topk_logprobs": ({"float16"}, 2, "N"),
        "aligned": ({"uint8"}, 1, "N"),
        "gold_logprob": ({"float16"}, 1, "N"),
        "gold_nbytes": ({"uint16"}, 1, "N"),
    },
    "fused": {
        **_COMMON,
        "input_ids": ({"uint16", "int32"}, 1, "N"),
        "target_ids": ({"int32"}, 2, "N"),
        "target_probs": ({"float16"}, 2, "N"),
        "choice": ({"int8"}, 1, "*"),
    },
    # Free-form shards (prepared documents, evaluation data): no array contract beyond the container.
    "raw": {},
}


class ShardError(ValueError):
    """A shard that cannot be used: missing, truncated, corrupt, or not of the expected kind."""


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest id dtype that holds every id of a vocabulary (uint16 up to 65,536 entries)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def id_bits(ids: np.ndarray) -> int:
    """Bits per entry that hold every id + 1 of `ids` (>= -1; -1, an empty entry, packs as 0)."""
    return max(1, (int(ids.max()) + 1 if ids.size else 0).bit_length())


def _row_chunks(n: int, width: int) -> range:
    return range(0, n, max(1, _PACK_ENTRIES // max(1, width)))


def pack_ids(ids: np.ndarray, bits: int) -> np.ndarray:
    """[n, k] ids (>= -1, each + 1 < 2**bits) as uint8 [n, ceil(k * bits / 8)], little-endian bit order."""
    n, k = ids.shape
    out = np.empty((n, (k * bits + 7) // 8), np.uint8)
    step = _row_chunks(n, k).step
    for lo in _row_chunks(n, k):
        v = (ids[lo : lo + step].astype(np.int64) + 1).astype("<u4").reshape(-1, 1).view(np.uint8)
        b = np.unpackbits(v, axis=1, bitorder="little")[:, :bits]  # [rows * k, bits]
        out[lo : lo + step] = np.packbits(b.reshape(-1, k * bits), axis=1, bitorder="little")
    return out


def unpack_ids(packed: np.ndarray, bits: int, width: int, dtype: str) -> np.ndarray:
    """The [n, width] ids `pack_ids` packed, as `dtype` (empty entries -1)."""
    n = packed.shape[0]
    out = np.empty((n, width), dtype)
    step = _row_chunks(n, width).step
    for lo in _row_chunks(n, width):
        b = np.unpackbits(packed[lo : lo + step], axis=1, count=width * bits, bitorder="little")
        b = np.pad(b.reshape(-1, bits), ((0, 0), (0, 32 - bits)))  # each id's bits, padded to 32
        v = np.packbits(b, axis=1, bitorder="little").view("<u4").reshape(-1, width).astype(np.int64)
        out[lo : lo + step] = v - 1
    return out


def _packing(arrays: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """{name: {bits, width, dtype}} of the id arrays that packing makes smaller."""
    out = {}
    for name in PACKABLE:
        a = arrays.get(name)
        if a is None or a.ndim != 2 or not a.size or int(a.min()) < -1:
            continue
        if (bits := id_bits(a)) < 8 * a.dtype.itemsize:
            out[name] = {"bits": bits, "width": int(a.shape[1]), "dtype": str(a.dtype)}
    return out


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    sha256: str
    nbytes: int
    counts: dict[str, int]


def _counts(arrays: dict[str, np.ndarray]) -> dict[str, int]:
    out = {}
    if "doc_offsets" in arrays:
        out["documents"] = int(len(arrays["doc_offsets"]) - 1)
        out["tokens"] = int(arrays["doc_offsets"][-1]) if len(arrays["doc_offsets"]) else 0
    return out


def validate_arrays(kind: str, arrays: dict[str, Any], where: str) -> None:
    """Check that `arrays` hold what a shard of `kind` must hold; raise ShardError naming the problem."""
    if kind not in SCHEMAS:
        raise ShardError(f"{where}: unknown shard kind {kind!r}; expected one of {sorted(SCHEMAS)}")
    schema = SCHEMAS[kind]
    missing = sorted(set(schema) - set(arrays))
    if missing:
        raise ShardError(f"{where}: {kind} shard lacks arrays {missing}")
    if not schema:
        return
    n_docs = len(arrays["doc_offsets"]) - 1
    offsets = np.asarray(arrays["doc_offsets"])
    if n_docs < 0 or (n_docs and (offsets[0] != 0 or np.any(np.diff(offsets) < 0))):
        raise ShardError(f"{where}: doc_offsets must start at 0 and never decrease")
    n_tok = int(offsets[-1]) if len(offsets) else 0
    dims = {"N": n_tok, "D": n_docs, "D+1": n_docs + 1}
    widths = set()
    for name, (dtypes, ndim, lead) in schema.items():
        a = arrays[name]
        if str(a.dtype) not in dtypes:
            raise ShardError(f"{where}: array {name} has dtype {a.dtype}, expected one of {sorted(dtypes)}")
        if a.ndim != ndim:
            raise ShardError(f"{where}: array {name} has {a.ndim} dimensions, expected {ndim}")
        if lead == "*":
            if a.shape[0] not in (n_docs, n_tok):
                raise ShardError(f"{where}: array {name} has {a.shape[0]} rows; expected {n_docs} or {n_tok}")
        elif a.shape[0] != dims[lead]:
            raise ShardError(f"{where}: array {name} has {a.shape[0]} rows, expected {dims[lead]} ({lead})")
        if ndim == 2 and name.endswith(("ids", "logprobs", "probs")):
            widths.add(a.shape[1])
    if len(widths) > 1:
        raise ShardError(f"{where}: top-k arrays disagree on width: {sorted(widths)}")


def write_shard(
    path: str | os.PathLike, kind: str, arrays: dict[str, np.ndarray], meta: dict[str, Any] | None = None
) -> ShardInfo:
    """Validate and write one shard atomically; return its checksum and size for the stage manifest."""
    from safetensors.numpy import save_file

    path = Path(path)
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    validate_arrays(kind, arrays, str(path))
    packed = _packing(arrays)
    stored = {k: pack_ids(a, packed[k]["bits"]) if k in packed else a for k, a in arrays.items()}
    # ONE metadata key: safetensors stores the metadata map in hash order, which differs from process to
    # process, so several keys would make identical shards differ in bytes (and in sha256).
    doc = {"kind": kind, "format_version": FORMAT_VERSION, "meta": meta or {}, "packed": packed}
    header = {_HEADER_KEY: json.dumps(doc, sort_keys=True, separators=(",", ":"))}
    with atomic_path(path) as tmp:
        save_file(stored, tmp, metadata=header)
        digest = sha256_file(tmp)
    return ShardInfo(path, digest, path.stat().st_size, _counts(arrays))


class Shard:
    """A read-only shard. Arrays load lazily from the memory-mapped file (`shard["topk_ids"]`)."""

    def __init__(
        self, path: Path, kind: str, meta: dict[str, Any], handle: Any, packed: dict[str, Any] | None = None
    ):
        self.path, self.kind, self.meta, self._h = path, kind, meta, handle
        self.packed = packed or {}  # {name: {bits, width, dtype}} of the arrays stored packed
        self._cache: dict[str, np.ndarray] = {}

    def keys(self) -> list[str]:
        return list(self._h.keys())

    def __contains__(self, name: str) -> bool:
        return name in self._h.keys()  # noqa: SIM118  (safe_open handles are not mappings)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._cache:
            try:
                self._cache[name] = self._unpacked(name, self._h.get_tensor(name))
            except Exception as err:  # safetensors raises its own error types
                raise ShardError(f"{self.path}: cannot read array {name}: {err}") from None
        return self._cache[name]

    def _unpacked(self, name: str, stored: np.ndarray) -> np.ndarray:
        p = self.packed.get(name)
        return stored if p is None else unpack_ids(stored, p["bits"], p["width"], p["dtype"])

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of one array, read from the memory map without loading the whole array
        (training streams blocks of a few thousand rows out of multi-GB shards). Clamped to the array."""
        if name in self._cache:
            return self._cache[name][start:stop]
        try:
            sl = self._h.get_slice(name)
            n = int(sl.get_shape()[0])
            lo, hi = max(0, min(start, n)), max(0, min(stop, n))
            if hi <= lo:  # safetensors rejects empty slices at the end of an array
                return self._unpacked(
                    name, np.empty((0, *sl.get_shape()[1:]), dtype=_ST_DTYPES[sl.get_dtype()])
                )
            return self._unpacked(name, sl[lo:hi])
        except Exception as err:  # safetensors raises its own error types
            raise ShardError(f"{self.path}: cannot read rows {start}:{stop} of {name}: {err}") from None

    @property
    def n_docs(self) -> int:
        return len(self["doc_offsets"]) - 1

    @property
    def n_tokens(self) -> int:
        return int(self["doc_offsets"][-1])

    def doc_slice(self, i: int) -> slice:
        off = self["doc_offsets"]
        return slice(int(off[i]), int(off[i + 1]))


def read_shard(path: str | os.PathLike, kind: str | None = None, sha256: str | None = None) -> Shard:
    """Open a shard, checking container, kind, checksum (when given) and array contract."""
    from safetensors import safe_open

    path = Path(path)
    fix = "delete it and rerun the stage that writes it (complete shards are skipped, this one is redone)"
    if not path.is_file():
        raise ShardError(f"{path}: shard is missing; rerun the stage that writes it")
    if sha256 is not None and sha256_file(path) != sha256:
        raise ShardError(f"{path}: checksum mismatch (corrupt or partial shard); {fix}")
    try:
        h = safe_open(str(path), framework="numpy")
        header = h.metadata() or {}
    except Exception as err:
        raise ShardError(f"{path}: not a readable shard ({err}); {fix}") from None
    try:
        packed: dict[str, Any] = {}
        if _HEADER_KEY in header:
            doc = json.loads(header[_HEADER_KEY])
            got, meta, packed = doc.get("kind"), doc.get("meta", {}), doc.get("packed") or {}
        else:  # the earlier layout: kind / format_version / meta as separate keys
            got, meta = header.get("kind"), json.loads(header.get("meta", "{}"))
    except (ValueError, AttributeError) as err:
        raise ShardError(f"{path}: unreadable FusionRun header ({err}); {fix}") from None
    if got is None:
        raise ShardError(f"{path}: not a FusionRun shard (no kind in header); {fix}")
    if kind is not None and got != kind:
        raise ShardError(f"{path}: expected a {kind} shard, found {got}")
    shard = Shard(path, got, meta, h, packed)
    shapes = {k: _LazyShape(h, k, packed.get(k)) for k in h.keys()}  # noqa: SIM118
    bad = [
        k
        for k, p in packed.items()
        if k in shapes and shapes[k].stored_width != (p["width"] * p["bits"] + 7) // 8
    ]
    if bad:
        raise ShardError(f"{path}: packed arrays {bad} do not match their header; {fix}")
    validate_arrays(got, shapes, str(path))
    return shard


class _LazyShape:
    """Shape and dtype of an array without reading it (validation of big shards stays cheap)."""

    def __init__(self, handle: Any, name: str, packed: dict[str, Any] | None = None):
        sl = handle.get_slice(name)
        self.shape = tuple(sl.get_shape())
        self.stored_width = self.shape[1] if len(self.shape) > 1 else None
        # Validation compares dtype names only. bf16 and fp8 have no numpy dtype: keep their names so they
        # fail validation by name instead of passing as something they are not.
        self.dtype = _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype())
        if packed:  # validated as what readers get
            self.shape, self.dtype = (self.shape[0], packed["width"]), packed["dtype"]
        self.ndim = len(self.shape)
        self._h, self._name = handle, name

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self._h.get_tensor(self._name)


_ST_DTYPES = {
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "I32": "int32",
    "U32": "uint32",
    "I64": "int64",
    "U64": "uint64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "BOOL": "bool",
}
