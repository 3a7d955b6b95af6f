"""prepare: corpus -> documents that fit every model, a held-out split, and `extraction.shards` shards.

Writes prepare/shard-SSSSS.safetensors (kind raw: text uint8, doc_offsets int64 byte offsets, doc_index
int64 global ids) for training documents, prepare/heldout.safetensors for evaluation, and the manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jobs.corpus import (
    CorpusError,
    assign_shards,
    corpus_stamp,
    heldout_split,
    pack_texts,
    read_documents,
    split_to_fit,
)
from jobs.spec import Store as StoreSpec
from jobs.stages.common import StageContext, StageError, log_event, shard_key
from jobs.store import StoreError, download_model

HELDOUT_KEY = "prepare/heldout.safetensors"


def corpus_path(ctx: StageContext, uri: str | None = None, field: str = "corpus") -> Path:
    """A local path of the corpus (or of another text at `uri`, named `field` in errors): s3:// texts are
    downloaded first (a folder into the cache, keyed by its objects' ETags: a changed folder is fetched
    again)."""
    uri = uri or ctx.spec.corpus.uri
    if uri.startswith("s3://"):
        try:
            if _is_object(ctx, uri):  # one file
                return _download_object(ctx, uri)
            return Path(download_model(s3_spec(ctx.store, ctx.spec), uri, fresh=True))  # a folder (prefix)
        except StoreError as err:
            raise StageError(f"{field}.uri {uri}: {err}") from None
    return Path(uri[len("file://") :] if uri.startswith("file://") else uri)


def s3_spec(store: Any, spec: Any) -> StoreSpec:
    """The endpoint and credentials that read s3:// texts: the run store's (a corpus may be in another
    bucket of the same S3)."""
    from jobs.store import S3Store

    return store.spec if isinstance(store, S3Store) else spec.store


def _is_object(ctx: StageContext, uri: str) -> bool:
    from jobs.store import S3Store, parse_s3_uri

    bucket, key = parse_s3_uri(uri)
    return S3Store(s3_spec(ctx.store, ctx.spec), bucket, "").size(key) is not None


def _download_object(ctx: StageContext, uri: str) -> Path:
    from jobs.store import S3Store, parse_s3_uri

    bucket, key = parse_s3_uri(uri)
    src = S3Store(s3_spec(ctx.store, ctx.spec), bucket, "")
    return src.download(key, ctx.scratch / "corpus" / Path(key).name)


def load_tokenizers(ctx: StageContext) -> list[Any]:
    from fusion.hub import load_tokenizer

    toks = []
    for m in ctx.spec.models:
        uri = download_model(ctx.store, m.tokenizer_uri)
        try:
            toks.append(load_tokenizer(uri, m.gguf_file))
        except Exception as err:
            field = "tokenizer" if m.tokenizer else "uri"
            raise StageError(
                f"model {m.name}: cannot load its tokenizer from {m.tokenizer_uri} ({err}); fix "
                f"{field} of model {m.name} in the spec"
            ) from None
    return toks


def write_docs(ctx: StageContext, key: str, texts: list[str], doc_index: np.ndarray, split: str) -> int:
    from fusion.format import write_shard

    text, offsets = pack_texts(texts)
    path = ctx.output_path(key)
    info = write_shard(
        path,
        "raw",
        {"text": text, "doc_offsets": offsets, "doc_index": doc_index.astype(np.int64)},
        meta={"split": split, "documents": len(texts)},
    )
    ctx.add_output(key, path, info.sha256)
    return int(offsets[-1])


def run(ctx: StageContext) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = ctx.spec
    # Before reading: an edit during the read makes the next run redo. An S3 failure: a clear StoreError.
    stamp = corpus_stamp(spec.corpus, s3_spec(ctx.store, spec))
    try:
        docs = read_documents(corpus_path(ctx), spec.corpus)
    except CorpusError as err:
        raise StageError(str(err)) from None
    train_ids, held_ids = heldout_split(len(docs), spec.corpus.heldout_fraction, spec.corpus.seed)
    toks = load_tokenizers(ctx)
    # A model whose documents start with BOS (addBos, or its tokenizer's default) needs one more token.
    from fusion.tokens import adds_bos_by_default

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
        raise StageError(
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
    for s, ids in enumerate(assign_shards(len(train_texts), spec.extraction.shards)):
        if len(ids) == 0:
            raise StageError(
                f"extraction.shards={spec.extraction.shards} exceeds the {len(train_texts)} "
                "training documents: lower extraction.shards"
            )
        shard_bytes.append(
            write_docs(ctx, shard_key("prepare", s), [train_texts[i] for i in ids], ids, "train")
        )
    held_bytes = write_docs(ctx, HELDOUT_KEY, held_texts, np.arange(len(held_texts)), "heldout")
    counts = {
        "documents": len(docs),
        "train_documents": len(train_texts),
        "heldout_documents": len(held_texts),
        "train_bytes": int(sum(shard_bytes)),
        "heldout_bytes": held_bytes,
    }
    summary = {"documents_cut": n_cut, "shards": spec.extraction.shards, "corpus_stamp": stamp}
    return counts, summary


def texts_changed(store: Any, spec: Any, task: Any) -> str | None:
    """Why a task complete by its manifest must still be redone: the text it read changed although the spec
    did not (prepare: the corpus; evaluate: evaluation.corpora). None when nothing changed."""
    from jobs.plan import Stage

    if task.stage is Stage.prepare:
        return "corpus changed" if corpus_changed(store, spec) else None
    if task.stage is Stage.evaluate and (spec.evaluation.corpora or spec.evaluation.task_dirs):
        from jobs.manifest import read_manifest
        from jobs.stages.evaluate_tasks import task_dir_stamps

        m = read_manifest(store, "evaluate/manifest.json")
        summary = (m or {}).get("summary", {})
        recorded = summary.get("corpora_stamps")
        if spec.evaluation.corpora and recorded is not None and recorded != eval_corpora_stamps(store, spec):
            return "evaluation corpus changed"
        recorded = summary.get("task_dir_stamps")
        if spec.evaluation.task_dirs and recorded is not None and recorded != task_dir_stamps(store, spec):
            return "evaluation task folder changed"
    return None


def eval_corpora_stamps(store: Any, spec: Any) -> dict[str, str | None]:
    """The stamp of each evaluation.corpora text (corpus_stamp), by name."""
    return {c.name: corpus_stamp(c, s3_spec(store, spec)) for c in spec.evaluation.corpora}


def corpus_changed(store: Any, spec: Any) -> bool:
    """True when the corpus (local files or s3:// objects) changed since the complete prepare task read it.
    Raises StoreError when the corpus's S3 cannot be listed."""
    from jobs.manifest import read_manifest

    m = read_manifest(store, "prepare/manifest.json")
    recorded = (m or {}).get("summary", {}).get("corpus_stamp")
    return recorded is not None and recorded != corpus_stamp(spec.corpus, s3_spec(store, spec))
