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

from fusion.tokens import encode_documents
from jobs.corpus import CorpusError, read_documents, unpack_texts
from jobs.registry import BASELINES, Layout, Stage
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
    from jobs.stages.prepare import text_path

    c = ctx.spec.evaluation.corpora[i]
    field = f"evaluation.corpora.{i}"
    try:
        return read_documents(text_path(ctx, c.uri, field), c)
    except CorpusError as err:
        # The reader names the training corpus's fields; here they are this evaluation corpus's.
        raise InputError(str(err).replace("corpus.", f"{field}.")) from None


def run(ctx: StageContext) -> tuple[dict[str, Any], dict[str, Any]]:
    from jobs.stages.evaluate_tasks import prepare_tasks

    threads = set_threads(ctx.settings)
    plan = prepare_tasks(ctx)  # bad tasks fail here, before any model is scored
    sets = text_sets(ctx)
    results, task_scores = score_models(ctx, plan, sets)
    metrics = metrics_of(ctx, plan, sets, results, task_scores)
    ctx.put_json(Layout.METRICS, metrics)
    return metrics["heldout"], summary_of(ctx, metrics, results, threads)


def text_sets(ctx: StageContext) -> dict[str, list[str]]:
    """Text sets scored by every model: the held-out split first, then evaluation.corpora in spec order."""
    held = ctx.heldout()
    texts = unpack_texts(held["text"], held["doc_offsets"])
    limit = ctx.spec.evaluation.max_documents
    texts = texts[:limit] if limit else texts
    if not texts:
        raise InputError(
            "no held-out documents to evaluate on: raise corpus.heldoutFraction above 0 or set "
            "evaluation.enabled: false"
        )
    sets = {"heldout": texts}
    for i, c in enumerate(ctx.spec.evaluation.corpora):
        sets[c.name] = eval_corpus_texts(ctx, i)
    return sets


def score_models(
    ctx: StageContext, plan: Any, sets: dict[str, list[str]]
) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, dict[str, dict[str, Any]]]]:
    """Every model's figures on every text set (text -> label -> figures) and, with a task plan, its task
    scores (label -> task -> entry): the target before training, each trained variant, the sources."""
    from fusion.benchmarks import private_tokenizer
    from jobs.stages.evaluate_tasks import score_model

    results: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in sets}
    task_scores: dict[str, dict[str, dict[str, Any]]] = {}
    encoded: dict[str, dict[str, list[np.ndarray]]] = {}  # model name -> text set -> documents

    def add(label: str, name: str, model: Any, tok: Any, view: Any, hf_tok: Any) -> None:
        if name not in encoded:  # once per tokenizer: the target's variants share it
            bos = adds_bos(ctx, name, tok)
            encoded[name] = {text: encode_documents(tok, texts, add_bos=bos) for text, texts in sets.items()}
        for text, docs in encoded[name].items():
            results[text][label] = score(model, view, docs, ctx.spec.extraction.batch_tokens)
            figures = {k: x for k, x in results[text][label].items() if not k.startswith("doc_")}
            log_event("scored", task=ctx.task.id, model=label, text=text, **figures)
        if plan is not None:  # addBos as set, else lm-eval's default (the tokenizer's own)
            task_scores[label] = score_model(ctx, plan, label, model, hf_tok, ctx.spec.model(name).add_bos)

    tgt = ctx.spec.target.name
    tok, view = load_model_tokenizer(ctx, tgt)
    hf_tgt = private_tokenizer(tok) if plan is not None else None  # one copy for every target variant
    target = load_spec_model(ctx, tgt, vocab_size=view.vocab_size, eos_id=view.eos_id)
    add("target-before", tgt, target, tok, view, hf_tgt)
    for variant in [dep.variant or "fused" for dep in ctx.dependencies(Stage.train)]:
        add(variant, tgt, trained_model(ctx, variant, view.vocab_size), tok, view, hf_tgt)
    if ctx.spec.evaluation.evaluate_sources:
        for m in ctx.spec.sources:
            stok, sview = load_model_tokenizer(ctx, m.name)
            model = load_spec_model(ctx, m.name, vocab_size=sview.vocab_size, eos_id=sview.eos_id)
            add(
                f"source:{m.name}",
                m.name,
                model,
                stok,
                sview,
                private_tokenizer(stok) if plan is not None else None,
            )
    return results, task_scores


def metrics_of(
    ctx: StageContext,
    plan: Any,
    sets: dict[str, list[str]],
    results: dict[str, dict[str, dict[str, Any]]],
    task_scores: dict[str, dict[str, dict[str, Any]]],
) -> dict[str, Any]:
    """evaluate/metrics.json: each text set's figures per model, FuseLLM against each baseline the run
    trained (paired per document), and the task scores."""

    def block(name: str) -> dict[str, Any]:
        n_bytes = sum(len(t.encode("utf-8")) for t in sets[name])
        out: dict[str, Any] = {"documents": len(sets[name]), "bytes": n_bytes, "models": results[name]}
        for baseline in BASELINES:
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
    return metrics


def summary_of(
    ctx: StageContext, metrics: dict[str, Any], results: dict[str, dict[str, dict[str, Any]]], threads: int
) -> dict[str, Any]:
    """The manifest's summary: bits per byte of each model on each text set, the comparisons, the tasks."""

    def bpb(models: dict[str, dict[str, Any]]) -> dict[str, float]:
        return {
            k: round(v["bits_per_byte"], 5) for k, v in models.items() if math.isfinite(v["bits_per_byte"])
        }

    summary: dict[str, Any] = {"bits_per_byte": bpb(results["heldout"]), "threads": threads}
    summary |= {k: v for k, v in metrics.items() if k.startswith("fused_minus_")}
    for c in ctx.spec.evaluation.corpora:
        summary[f"bits_per_byte:{c.name}"] = bpb(results[c.name])
    if "task_summary" in metrics:
        summary["task_summary"] = metrics["task_summary"]
    return summary
