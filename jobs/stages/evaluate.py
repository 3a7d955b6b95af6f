"""evaluate: held-out bits per byte and perplexity of the target before training, the FuseLLM model, the
CLM-only baseline (when trained) and each source on its own tokenization -> evaluate/metrics.json.

Bits per byte compares models with different tokenizers fairly (the same text, whatever the token count);
perplexity is per token of each model's own tokenizer, so it is comparable only between the target variants.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from jobs.corpus import unpack_texts
from jobs.stages.common import (
    StageContext,
    StageError,
    adds_bos,
    load_model_tokenizer,
    load_spec_model,
    log_event,
    set_threads,
)

METRICS_KEY = "evaluate/metrics.json"


def trained_model_dir(ctx: StageContext, variant: str) -> str:
    """A local folder with the trained model of `variant` (train/<variant>/model/ in the store)."""
    prefix = f"train/{variant}/model/"
    local = ctx.store.local_path(prefix + "config.json")
    if local is not None and local.is_file():
        return str(local.parent)
    keys = ctx.store.list(prefix)
    if not keys:
        raise StageError(f"no trained model at {ctx.store.uri_for(prefix)}: the train task ({variant}) wrote "
                         "none; rerun train")
    dest = ctx.scratch / "models" / variant
    for k in keys:
        ctx.store.download(k, dest / k[len(prefix):])
    return str(dest)


def score(model: Any, view: Any, docs: list[np.ndarray], batch_tokens: int) -> dict[str, float]:
    from fusion.evaluate import bits_per_byte, perplexity, score_documents

    scores = score_documents(model, view, docs, batch_tokens=batch_tokens)
    # Per document too: paired comparisons between models (and their intervals) need them.
    return {"bits_per_byte": float(bits_per_byte(scores)), "perplexity": float(perplexity(scores)),
            "tokens": int(sum(len(d) for d in docs)),
            "doc_bits": [round(float(x), 4) for x in scores.nll / math.log(2)],
            "doc_bytes": [int(x) for x in scores.pred_nbytes]}


def fused_vs_clm(models: dict[str, dict[str, Any]]) -> dict[str, float] | None:
    """FuseLLM minus CLM-only in bits per byte with a 95% paired bootstrap interval over the held-out
    documents (negative: FuseLLM is better); None without both."""
    from fusion.evaluate import paired_bpb_difference

    f, c = models.get("fused"), models.get("clm")
    if not f or not c or "doc_bits" not in f or "doc_bits" not in c or not f["doc_bits"]:
        return None
    delta, lo, hi = paired_bpb_difference(np.array(f["doc_bits"]), np.array(c["doc_bits"]),
                                          np.array(f["doc_bytes"]))
    return {"bits_per_byte": round(delta, 5), "ci95_low": round(lo, 5), "ci95_high": round(hi, 5)}


def run(ctx: StageContext) -> tuple[dict[str, Any], dict[str, Any]]:
    from fusion.models import load_model
    from fusion.tokens import encode_documents

    threads = set_threads()
    held = ctx.input_shard(ctx.task_of("prepare"), "prepare/heldout.safetensors", "raw")
    texts = unpack_texts(held["text"], held["doc_offsets"])
    limit = ctx.spec.evaluation.max_documents
    texts = texts[:limit] if limit else texts
    if not texts:
        raise StageError("no held-out documents to evaluate on: raise corpus.heldoutFraction above 0 or set "
                         "evaluation.enabled: false")
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    tgt = ctx.spec.target.name
    tok, view = load_model_tokenizer(ctx, tgt)
    docs = encode_documents(tok, texts, add_bos=adds_bos(ctx, tgt, tok))
    models: dict[str, dict[str, Any]] = {}

    def add(label: str, model: Any, v: Any, d: list[np.ndarray]) -> None:
        models[label] = score(model, v, d, ctx.spec.extraction.batch_tokens)
        log_event("scored", task=ctx.task.id, model=label, **models[label])

    add("target-before", load_spec_model(ctx, tgt, view.vocab_size, view.eos_id), view, docs)
    variants = ["fused", *(["clm"] if ctx.spec.training.clm_baseline else [])]
    for variant in variants:
        path = trained_model_dir(ctx, variant)
        try:
            model = load_model(path, vocab_size=view.vocab_size, device=ctx.spec.extraction.device,
                               dtype=ctx.spec.extraction.dtype)
        except Exception as err:
            where = ctx.store.uri_for(f"train/{variant}/model/")
            raise StageError(f"trained model {variant} at {where} will not load ({err}); "
                             f"rerun train --variant {variant}") from None
        add("fused" if variant == "fused" else "clm", model, view, docs)
    if ctx.spec.evaluation.evaluate_sources:
        for m in ctx.spec.sources:
            stok, sview = load_model_tokenizer(ctx, m.name)
            add(f"source:{m.name}", load_spec_model(ctx, m.name, sview.vocab_size, sview.eos_id), sview,
                encode_documents(stok, texts, add_bos=adds_bos(ctx, m.name, stok)))
    metrics: dict[str, Any] = {"heldout": {"documents": len(texts), "bytes": n_bytes}, "models": models}
    comparison = fused_vs_clm(models)
    if comparison is not None:
        metrics["fused_minus_clm"] = comparison
    ctx.put_json(METRICS_KEY, metrics)
    summary = {k: round(v["bits_per_byte"], 5) for k, v in models.items()
               if math.isfinite(v["bits_per_byte"])}
    extra = {"fused_minus_clm": comparison} if comparison is not None else {}
    counts = {"documents": len(texts), "bytes": n_bytes}
    return counts, {"bits_per_byte": summary, "threads": threads, **extra}
