"""evaluate: held-out bits per byte and perplexity of the target before training, the FuseLLM model, the
CLM-only baseline (when trained) and each source on its own tokenization -> evaluate/metrics.json; the
same for each text of evaluation.corpora (e.g. another domain), under "corpora".

Bits per byte compares models with different tokenizers fairly (the same text, whatever the token count);
perplexity is per token of each model's own tokenizer, so it is comparable only between the target variants.

evaluation.tasks (lm-evaluation-harness benchmarks) are scored on the same models, each loaded once: see
jobs/stages/evaluate_tasks.py. Their table goes under "tasks" in evaluate/metrics.json, a small summary under
"task_summary" (which the operator copies into the status with the rest of metrics.json).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from jobs.corpus import unpack_texts
from jobs.registry import Layout, Stage, Variant
from jobs.stages.common import (
    InputError,
    StageContext,
    StageError,
    adds_bos,
    load_model_at,
    load_model_tokenizer,
    load_spec_model,
    log_event,
    set_threads,
)

BASELINES = tuple(v.value for v in Variant if v is not Variant.fused)


def trained_model_dir(ctx: StageContext, variant: str) -> str:
    """A local folder with the trained model of `variant` (its model prefix in the store)."""
    prefix = Layout.model_prefix(variant)
    local = ctx.store.local_path(prefix + "config.json")
    if local is not None and local.is_file():
        return str(local.parent)
    keys = ctx.store.list(prefix)
    if not keys:
        raise StageError(
            f"no trained model at {ctx.store.uri_for(prefix)}: the train task ({variant}) wrote "
            "none; rerun train"
        )
    dest = ctx.scratch / "models" / variant
    for k in keys:
        ctx.store.download(k, dest / k[len(prefix) :])
    return str(dest)


def trained_model(ctx: StageContext, variant: str, vocab_size: int) -> Any:
    """The model the train task of `variant` made, by the stages' one loader (common.load_model_at)."""
    where = ctx.store.uri_for(Layout.model_prefix(variant))
    return load_model_at(
        trained_model_dir(ctx, variant),
        what=f"trained model {variant} at {where}",
        fix=f"Rerun train --variant {variant}",
        vocab_size=vocab_size,
        device=ctx.spec.extraction.device,
        dtype=ctx.spec.extraction.dtype,
    )


def score(model: Any, view: Any, docs: list[np.ndarray], batch_tokens: int) -> dict[str, float]:
    from fusion.evaluate import bits_per_byte, perplexity, score_documents

    scores = score_documents(model, view, docs, batch_tokens=batch_tokens)
    # Per document too: paired comparisons between models (and their intervals) need them.
    return {
        "bits_per_byte": float(bits_per_byte(scores)),
        "perplexity": float(perplexity(scores)),
        "tokens": int(sum(len(d) for d in docs)),
        "doc_bits": [round(float(x), 4) for x in scores.nll / math.log(2)],
        "doc_bytes": [int(x) for x in scores.pred_nbytes],
    }


def fused_vs_clm(models: dict[str, dict[str, Any]], baseline: str = "clm") -> dict[str, float] | None:
    """FuseLLM minus a baseline (CLM-only by default) in bits per byte with a 95% paired bootstrap interval
    over the held-out documents (negative: FuseLLM is better); None without both."""
    from fusion.evaluate import paired_bpb_difference

    f, c = models.get("fused"), models.get(baseline)
    if not f or not c or "doc_bits" not in f or "doc_bits" not in c or not f["doc_bits"]:
        return None
    delta, lo, hi = paired_bpb_difference(
        np.array(f["doc_bits"]), np.array(c["doc_bits"]), np.array(f["doc_bytes"])
    )
    return {"bits_per_byte": round(delta, 5), "ci95_low": round(lo, 5), "ci95_high": round(hi, 5)}


def eval_corpus_texts(ctx: StageContext, i: int) -> list[str]:
    """The documents of evaluation.corpora[i], read like the training corpus (local or s3://)."""
    from jobs.corpus import CorpusError, read_documents
    from jobs.stages.prepare import text_path

    c = ctx.spec.evaluation.corpora[i]
    field = f"evaluation.corpora.{i}"
    try:
        return read_documents(text_path(ctx, c.uri, field), c)
    except CorpusError as err:
        # The reader names the training corpus's fields; here they are this evaluation corpus's.
        raise InputError(str(err).replace("corpus.", f"{field}.")) from None


def run(ctx: StageContext) -> tuple[dict[str, Any], dict[str, Any]]:
    from fusion.benchmarks import private_tokenizer
    from fusion.tokens import encode_documents
    from jobs.stages.evaluate_tasks import prepare_tasks, score_model

    threads = set_threads(ctx.settings)
    plan = prepare_tasks(ctx)  # bad tasks fail here, before any model is scored
    held = ctx.heldout()
    texts = unpack_texts(held["text"], held["doc_offsets"])
    limit = ctx.spec.evaluation.max_documents
    texts = texts[:limit] if limit else texts
    if not texts:
        raise InputError(
            "no held-out documents to evaluate on: raise corpus.heldoutFraction above 0 or set "
            "evaluation.enabled: false"
        )
    # Text sets scored by every model: the held-out split first, then evaluation.corpora in spec order.
    sets = {"heldout": texts}
    for i, c in enumerate(ctx.spec.evaluation.corpora):
        sets[c.name] = eval_corpus_texts(ctx, i)
    results: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in sets}
    tgt = ctx.spec.target.name
    tok, view = load_model_tokenizer(ctx, tgt)
    tgt_bos = adds_bos(ctx, tgt, tok)
    docs = {name: encode_documents(tok, t, add_bos=tgt_bos) for name, t in sets.items()}

    task_scores: dict[str, dict[str, dict[str, Any]]] = {}  # model label -> task name -> entry
    hf_tgt = private_tokenizer(tok) if plan is not None else None  # one copy for the three target variants

    def add(
        label: str, model: Any, v: Any, encoded: dict[str, list[np.ndarray]], hf_tok: Any, name: str
    ) -> None:
        for text, d in encoded.items():
            results[text][label] = score(model, v, d, ctx.spec.extraction.batch_tokens)
            figures = {k: x for k, x in results[text][label].items() if not k.startswith("doc_")}
            log_event("scored", task=ctx.task.id, model=label, text=text, **figures)
        if plan is not None:  # addBos as set, else lm-eval's default (the tokenizer's own)
            task_scores[label] = score_model(ctx, plan, label, model, hf_tok, ctx.spec.model(name).add_bos)

    target = load_spec_model(ctx, tgt, vocab_size=view.vocab_size, eos_id=view.eos_id)
    add("target-before", target, view, docs, hf_tgt, tgt)
    for variant in [dep.variant or "fused" for dep in ctx.dependencies(Stage.train)]:
        add(variant, trained_model(ctx, variant, view.vocab_size), view, docs, hf_tgt, tgt)
    if ctx.spec.evaluation.evaluate_sources:
        for m in ctx.spec.sources:
            stok, sview = load_model_tokenizer(ctx, m.name)
            bos = adds_bos(ctx, m.name, stok)
            add(
                f"source:{m.name}",
                load_spec_model(ctx, m.name, vocab_size=sview.vocab_size, eos_id=sview.eos_id),
                sview,
                {name: encode_documents(stok, t, add_bos=bos) for name, t in sets.items()},
                private_tokenizer(stok) if plan is not None else None,
                m.name,
            )

    def block(name: str) -> dict[str, Any]:
        n_bytes = sum(len(t.encode("utf-8")) for t in sets[name])
        out: dict[str, Any] = {"documents": len(sets[name]), "bytes": n_bytes, "models": results[name]}
        for baseline in BASELINES:  # FuseLLM against each baseline the run trained, paired per document
            comparison = fused_vs_clm(results[name], baseline)
            if comparison is not None:
                out[f"fused_minus_{baseline}"] = comparison
        return out

    held_block = block("heldout")
    metrics: dict[str, Any] = {
        "heldout": {"documents": held_block["documents"], "bytes": held_block["bytes"]},
        **{k: v for k, v in held_block.items() if k not in ("documents", "bytes")},
    }
    if ctx.spec.evaluation.corpora:
        metrics["corpora"] = {c.name: block(c.name) for c in ctx.spec.evaluation.corpora}
    if plan is not None:
        from jobs.stages.evaluate_tasks import task_summary, tasks_block

        metrics["tasks"] = tasks_block(plan.requests, task_scores)
        metrics["task_summary"] = task_summary(metrics["tasks"], plan.requests)
    ctx.put_json(Layout.METRICS, metrics)

    def bpb(models: dict[str, dict[str, Any]]) -> dict[str, float]:
        return {
            k: round(v["bits_per_byte"], 5) for k, v in models.items() if math.isfinite(v["bits_per_byte"])
        }

    summary: dict[str, Any] = {"bits_per_byte": bpb(results["heldout"]), "threads": threads}
    summary |= {k: v for k, v in metrics.items() if k.startswith("fused_minus_")}
    for c in ctx.spec.evaluation.corpora:
        summary[f"bits_per_byte:{c.name}"] = bpb(results[c.name])
    if plan is not None:
        summary["task_summary"] = metrics["task_summary"]
    return metrics["heldout"], summary
