"""Reading a corpus into documents, and the prepare stage's pure decisions (split, cut, distribute).

Formats (spec.corpus.format, 'auto' decides by what the path is):
  text     a file: one document per blank-line-separated paragraph; a folder: one document per file
           matching corpus.glob (default every file), in sorted path order; non-UTF-8 files are skipped
  jsonl    one JSON object per line, the text in corpus.textField
  parquet  a file or a folder of *.parquet (needs pyarrow)
  hf-disk  a dataset saved with `datasets.Dataset.save_to_disk` (needs datasets); split 'train' of a
           DatasetDict
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jobs.locations import stamp
from jobs.spec import TextSource
from jobs.store import StoreError


class CorpusError(ValueError):
    """A corpus that cannot be read; the message names the file or field and the fix."""


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.is_dir():
        if (
            (path / "dataset_info.json").is_file()
            or (path / "dataset_dict.json").is_file()
            or (path / "state.json").is_file()
        ):
            return "hf-disk"
        if any(path.glob("*.parquet")):
            return "parquet"
        return "text"
    suffixes = "".join(path.suffixes[-2:]).lower()
    if suffixes.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if suffixes.endswith(".parquet"):
        return "parquet"
    return "text"


def split_paragraphs(text: str) -> list[str]:
    """Blank-line-separated paragraphs, stripped, empty ones dropped."""
    return [p.strip() for p in re.split(r"\n[ \t]*\n", text) if p.strip()]


def _text_docs(path: Path, glob: str | None) -> Iterator[str]:
    if path.is_file():
        yield from split_paragraphs(path.read_text(encoding="utf-8", errors="replace"))
        return
    for f in sorted(p for p in path.glob(glob or "**/*") if p.is_file()):
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary or another encoding: not text we can train on
        if text.strip():
            yield text


def _jsonl_docs(path: Path, field: str, glob: str | None) -> Iterator[str]:
    files = [path] if path.is_file() else sorted(path.glob(glob or "**/*.jsonl"))
    for f in files:
        with open(f, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise CorpusError(
                        f"{f}:{lineno}: not valid JSON ({err.msg}); fix the line or drop it"
                    ) from None
                if not isinstance(obj, dict) or field not in obj:
                    raise CorpusError(
                        f"{f}:{lineno}: no field {field!r}; set corpus.textField to the field "
                        "that holds the text"
                    )
                if not isinstance(obj[field], str):
                    kind = type(obj[field]).__name__
                    raise CorpusError(f"{f}:{lineno}: field {field!r} is {kind}, not text")
                yield obj[field]


def _parquet_docs(path: Path, field: str, glob: str | None) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError(
            f"{path}: reading parquet needs pyarrow, which is not installed; "
            "`pip install pyarrow`, or convert the corpus to jsonl"
        ) from None
    files = [path] if path.is_file() else sorted(path.glob(glob or "**/*.parquet"))
    for f in files:
        table = pq.read_table(f)
        if field not in table.column_names:
            raise CorpusError(f"{f}: no column {field!r} (has {table.column_names}); set corpus.textField")
        yield from (t for t in table.column(field).to_pylist() if isinstance(t, str))


def _hf_docs(path: Path, field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise CorpusError(
            f"{path}: reading a saved Hugging Face dataset needs `datasets`, which is not "
            "installed; `pip install datasets`, or export the corpus to jsonl"
        ) from None
    ds: Any = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise CorpusError(f"{path}: a DatasetDict without a 'train' split (has {list(ds)}); save one")
        ds = ds["train"]
    if field not in ds.column_names:
        raise CorpusError(f"{path}: no column {field!r} (has {ds.column_names}); set corpus.textField")
    yield from (t for t in ds[field] if isinstance(t, str))


def corpus_stamp(corpus: TextSource, s3: Any = None) -> str | None:
    """A cheap fingerprint of the corpus's files (jobs.locations.stamp of corpus.uri with corpus.glob): an
    edited corpus makes the prepare task stale although the spec is unchanged. None when nothing is there.
    `s3`: the run store, its spec or an S3Endpoint (None: AWS's default chain); StoreError on S3 failure."""
    try:
        return stamp(corpus.uri, s3, corpus.glob)
    except StoreError as err:
        raise StoreError(f"corpus.uri {corpus.uri}: {err}", permanent=err.permanent) from None


def read_documents(path: Path, corpus: TextSource) -> list[str]:
    """Documents of the corpus at local `path`, after corpus.maxDocuments / maxBytes (in reading order)."""
    if not path.exists():
        raise CorpusError(f"corpus.uri: {path} does not exist; point corpus.uri at a file or folder of text")
    fmt = detect_format(path, corpus.format)
    if fmt == "text":
        it = _text_docs(path, corpus.glob)
    elif fmt == "jsonl":
        it = _jsonl_docs(path, corpus.text_field, corpus.glob)
    elif fmt == "parquet":
        it = _parquet_docs(path, corpus.text_field, corpus.glob)
    elif fmt == "hf-disk":
        it = _hf_docs(path, corpus.text_field)
    else:
        raise CorpusError(f"corpus.format: unknown format {fmt!r}")
    docs: list[str] = []
    total = 0
    for text in it:
        if not text.strip():
            continue
        if corpus.max_bytes is not None:
            n = len(text.encode("utf-8"))
            if total + n > corpus.max_bytes:
                break
            total += n
        docs.append(text)
        if corpus.max_documents is not None and len(docs) >= corpus.max_documents:
            break
    if not docs:
        raise CorpusError(
            f"corpus.uri: {path} holds no documents (format {fmt}, glob {corpus.glob!r}); "
            "check corpus.uri, corpus.glob and corpus.format"
        )
    return docs


# --------------------------------------------------------------------------------------------------
# Pure decisions of the prepare stage


def heldout_split(n_docs: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, held-out ids), both sorted: a seeded random choice of round(fraction * n) documents,
    at least one when fraction > 0 and there are two or more documents (never all of them)."""
    n_held = round(fraction * n_docs)
    if fraction > 0 and n_docs >= 2:
        n_held = min(max(n_held, 1), n_docs - 1)
    perm = np.random.default_rng(seed).permutation(n_docs)
    return np.sort(perm[n_held:]), np.sort(perm[:n_held])


def cut_points(offsets: Sequence[tuple[int, int]], n_tokens: int, max_tokens: int) -> list[int]:
    """Character positions where to cut a text so that each piece holds at most `max_tokens` of these
    tokens: the start of every max_tokens-th token (offsets: the tokenizer's (start, end) per token)."""
    return [offsets[i][0] for i in range(max_tokens, n_tokens, max_tokens) if offsets[i][0] > 0]


def split_to_fit(
    texts: list[str], tokenizers: list[Any], max_length: int, max_rounds: int = 8
) -> list[list[str]]:
    """For each text, the pieces it must be cut into so that every piece is at most `max_length` tokens
    (EOS included) under EVERY tokenizer. A text too long under some tokenizer is cut at token boundaries
    of the tokenizer that makes it longest; pieces are re-measured under all tokenizers and cut again if
    needed (a piece can tokenize differently from the same stretch inside the whole text). Whitespace-only
    pieces are dropped. Tokenization is batched (C-backed); loops run over documents, not tokens."""
    budget = max_length - 1  # room for the EOS every document ends with
    result: list[list[str]] = [[t] for t in texts]
    pending = list(range(len(texts)))  # documents whose pieces still need measuring
    for _ in range(max_rounds):
        if not pending:
            return result
        flat = [(d, j, p) for d in pending for j, p in enumerate(result[d])]
        pieces = [p for _, _, p in flat]
        lengths = np.stack([_lengths(tok, pieces) for tok in tokenizers])  # [tokenizers, pieces]
        worst = lengths.argmax(axis=0)
        too_long = np.flatnonzero(lengths.max(axis=0) > budget)
        if too_long.size == 0:
            return result
        new: dict[int, list[str]] = {d: list(result[d]) for d in pending}
        replaced: dict[tuple[int, int], list[str]] = {}
        for tok_i in np.unique(worst[too_long]):
            sel = [int(i) for i in too_long if worst[i] == tok_i]
            enc = tokenizers[tok_i](
                [pieces[i] for i in sel],
                add_special_tokens=False,
                split_special_tokens=True,
                return_offsets_mapping=True,
            )
            for i, offs in zip(sel, enc["offset_mapping"], strict=True):
                text = pieces[i]
                cuts = [0, *cut_points(offs, len(offs), budget), len(text)]
                parts = [text[a:b] for a, b in itertools.pairwise(cuts) if text[a:b].strip()]
                d, j, _ = flat[i]
                replaced[(d, j)] = parts
        still = set()
        for d in pending:
            out = []
            for j, p in enumerate(new[d]):
                if (d, j) in replaced:
                    out += replaced[(d, j)]
                    still.add(d)
                else:
                    out.append(p)
            result[d] = out
        pending = sorted(still)
    raise CorpusError(
        f"could not cut documents {pending[:5]} to extraction.maxLength={max_length} tokens "
        "in every tokenizer; raise extraction.maxLength"
    )


def _lengths(tok: Any, texts: list[str]) -> np.ndarray:
    if not texts:
        return np.zeros(0, dtype=np.int64)
    ids = tok(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))


def assign_shards(n_docs: int, n_shards: int) -> list[np.ndarray]:
    """Document ids of each shard: round-robin, so shards are balanced and each keeps corpus order."""
    ids = np.arange(n_docs)
    return [ids[s::n_shards] for s in range(n_shards)]


CUT = 1 << 40  # ids of pieces of cut documents start here (beyond any corpus's document count)
PIECE = 1 << 20  # pieces per document in that range


def piece_ids(pieces: list[list[str]]) -> list[np.ndarray]:
    """Stable ids of each document's pieces: a document kept whole is its position in the list; the k-th
    piece of a cut one is CUT + position * PIECE + k. A document cut differently (another run's tokenizers)
    changes only its own ids, so other documents keep theirs, and so do the shards holding them."""
    return [
        np.array([i], dtype=np.int64) if len(p) == 1 else CUT + i * PIECE + np.arange(len(p), dtype=np.int64)
        for i, p in enumerate(pieces)
    ]


def shard_pieces(pieces: list[list[str]], n_shards: int) -> list[tuple[list[str], np.ndarray]]:
    """(texts, ids) of each shard: whole documents round-robin (all pieces of a document in its shard, in
    order), so which shard a document goes to does not depend on how any other document was cut. With no
    document cut, this is assign_shards over the documents."""
    ids = piece_ids(pieces)
    out = []
    for docs in assign_shards(len(pieces), n_shards):
        texts = [t for d in docs for t in pieces[d]]
        out.append((texts, np.concatenate([ids[d] for d in docs]) if len(docs) else np.zeros(0, np.int64)))
    return out


def pack_texts(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 bytes of all texts as one uint8 array + int64 byte offsets [D+1]."""
    blobs = [t.encode("utf-8") for t in texts]
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in blobs], out=offsets[1:])
    return np.frombuffer(b"".join(blobs), dtype=np.uint8).copy(), offsets


def unpack_texts(text: np.ndarray, offsets: np.ndarray) -> list[str]:
    raw = np.asarray(text).tobytes()
    off = np.asarray(offsets).tolist()
    return [raw[a:b].decode("utf-8") for a, b in itertools.pairwise(off)]
