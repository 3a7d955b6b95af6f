"""extract --model M --shard S: one model's top-k next-token log-probabilities over one prepared shard."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fusion.tokens import encode_documents
from jobs.corpus import unpack_texts
from jobs.registry import Stage
from jobs.stages.common import (
    InputError,
    Progress,
    StageContext,
    adds_bos,
    load_model_tokenizer,
    load_spec_model,
    set_threads,
)


def run(ctx: StageContext) -> tuple[dict[str, Any], dict[str, Any]]:
    from fusion.extract import extract_documents

    threads = set_threads(ctx.settings)
    name, s = ctx.task.model, ctx.task.shard
    assert name is not None and s is not None
    raw = ctx.input_shard(Stage.prepare)
    texts = unpack_texts(raw["text"], raw["doc_offsets"])
    tok, view = load_model_tokenizer(ctx, name)
    docs = encode_documents(tok, texts, add_bos=adds_bos(ctx, name, tok))
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    max_len = ctx.spec.extraction.max_length
    if lengths.size and lengths.max() > max_len:
        bad = int(np.argmax(lengths))
        raise InputError(
            f"document {int(raw['doc_index'][bad])} of prepared shard {s} has {int(lengths[bad])} tokens "
            f"under {name}'s tokenizer, over extraction.maxLength={max_len}: the prepare stage "
            "was run for other tokenizers; rerun prepare"
        )
    model = load_spec_model(ctx, name, vocab_size=view.vocab_size, eos_id=view.eos_id)
    progress = Progress(int(lengths.sum()), ctx.task.id, unit="tokens")
    arrays = extract_documents(
        model,
        view,
        docs,
        np.asarray(raw["doc_index"]),
        ctx.spec.extraction.top_k,
        ctx.spec.extraction.batch_tokens,
        progress,
    )
    progress.close()
    meta = {"model": name, "tokenizer": view.fingerprint(), "top_k": ctx.spec.extraction.top_k}
    info = ctx.write_shard(arrays, meta)
    nll, nbytes = float(arrays["doc_nll"].sum()), int(arrays["doc_pred_nbytes"].sum())
    bpb = nll / math.log(2) / nbytes if nbytes else float("nan")
    counts = {"documents": len(docs), "tokens": int(lengths.sum()), "bytes": info.nbytes}
    return counts, {"bits_per_byte": round(bpb, 5), "threads": threads}
