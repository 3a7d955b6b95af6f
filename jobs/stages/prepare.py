"""prepare: corpus -> documents that fit every model, a held-out split, and `extraction.shards` shards.

Writes each shard's training documents (Layout.documents; kind raw: text uint8, doc_offsets int64 byte
offsets, doc_index int64 stable document ids) and the held-out documents (Layout.HELDOUT).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fusion.hub import load_tokenizer
from fusion.tokens import adds_bos_by_default
from jobs.corpus import (
    CorpusError,
    heldout_split,
    pack_texts,
    read_documents,
    shard_pieces,
    split_to_fit,
)
from jobs.locations import fetch
from jobs.registry import Layout
from jobs.stages.common import InputError, StageContext, StageError, log_event, model_location
from jobs.store import StoreError


def text_path(ctx: StageContext, uri: str, field: str) -> Path:
    """A local path of a text source (the corpus, an evaluation corpus): s3:// objects and folders are
    downloaded first (jobs.locations.fetch); `field` names the spec field in errors."""
    try:
        return Path(fetch(uri, ctx.s3, kind="text", scratch=ctx.scratch))
    except StoreError as err:
        raise (InputError if err.permanent else StageError)(f"{field}.uri {uri}: {err}") from None


def load_tokenizers(ctx: StageContext) -> list[Any]:
    toks = []
    for m in ctx.spec.models:
        try:
            toks.append(load_tokenizer(model_location(ctx, m.tokenizer_uri), m.gguf_file))
        except StageError:
            raise
        except Exception as err:
            field = "tokenizer" if m.tokenizer else "uri"
            raise InputError(
                f"model {m.name}: cannot load its tokenizer from {m.tokenizer_uri} ({err}); fix "
                f"{field} of model {m.name} in the spec"
            ) from None
    return toks


def write_docs(ctx: StageContext, key: str, texts: list[str], doc_index: np.ndarray, split: str) -> int:
    text, offsets = pack_texts(texts)
    arrays = {"text": text, "doc_offsets": offsets, "doc_index": doc_index.astype(np.int64)}
    ctx.write_shard(arrays, meta={"split": split, "documents": len(texts)}, key=key)
    return int(offsets[-1])


def run(ctx: StageContext) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = ctx.spec
    try:
        docs = read_documents(text_path(ctx, spec.corpus.uri, "corpus"), spec.corpus)
    except CorpusError as err:
        raise InputError(str(err)) from None
    train_ids, held_ids = heldout_split(len(docs), spec.corpus.heldout_fraction, spec.corpus.seed)
    toks = load_tokenizers(ctx)
    # A model whose documents start with BOS (addBos, or its tokenizer's default) needs one more token.
    bos = [
        m.add_bos if m.add_bos is not None else adds_bos_by_default(t)
        for m, t in zip(spec.models, toks, strict=True)
    ]
    max_len = spec.extraction.max_length - int(any(bos))

    train_pieces = split_to_fit([docs[i] for i in train_ids], toks, max_len)
    held_pieces = split_to_fit([docs[i] for i in held_ids], toks, max_len)
    train_texts = [p for pieces in train_pieces for p in pieces]
    held_texts = [p for pieces in held_pieces for p in pieces]
    if not train_texts:
        raise InputError(
            "corpus: no training documents left after the held-out split; add documents or "
            "lower corpus.heldoutFraction"
        )
    n_cut = sum(len(p) > 1 for p in train_pieces) + sum(len(p) > 1 for p in held_pieces)
    log_event(
        "prepared",
        task=ctx.task.id,
        documents=len(docs),
        train_pieces=len(train_texts),
        heldout_pieces=len(held_texts),
        documents_cut=n_cut,
    )

    shard_bytes = []
    for s, (texts, ids) in enumerate(shard_pieces(train_pieces, spec.extraction.shards)):
        if len(ids) == 0:
            raise InputError(
                f"extraction.shards={spec.extraction.shards} exceeds the {len(train_pieces)} "
                "training documents: lower extraction.shards"
            )
        shard_bytes.append(write_docs(ctx, Layout.documents(s), texts, ids, "train"))
    held_bytes = write_docs(ctx, Layout.HELDOUT, held_texts, np.arange(len(held_texts)), "heldout")
    counts = {
        "documents": len(docs),
        "train_documents": len(train_texts),
        "heldout_documents": len(held_texts),
        "train_bytes": int(sum(shard_bytes)),
        "heldout_bytes": held_bytes,
    }
    summary = {"documents_cut": n_cut, "shards": spec.extraction.shards}
    return counts, summary
