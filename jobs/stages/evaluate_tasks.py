"""evaluate, benchmark part: evaluation.tasks scored through lm-evaluation-harness on every model.

Checked first (before any model is scored): the task folders, their data files, the task names, and each
task built once by lm-eval. Then, per model, each task's score is kept in the store as soon as it is done,
in one object per model (`Layout.task_scores`), each entry keyed by what decides the score: the model's
identity (its spec, or the trained weights' digests) and the task's settings (name, few-shot, limit, the
digest of the folder defining it, lm-eval's version, length, batch size, scoring method, BOS). A failure
keeps the scores already made; a rerun scores only what is missing or changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusion.benchmarks import (
    LM_EVAL_VERSION,
    SCORING,
    installed_version,
    metric_from_docs,
    needs_builtin,
    paired_difference,
    scan_task_dirs,
    score_task,
    task_dir_digest,
    task_manager,
    wrap_model,
)
from jobs.benchmarks import dir_errors, exact_errors, requests
from jobs.complete import read_manifest
from jobs.registry import BASELINES, Layout, Stage
from jobs.stages.common import StageContext, StageError, log_event
from jobs.stages.prepare import text_path


@dataclass
class TaskPlan:
    requests: list[Any]  # fusion.benchmarks.TaskRequest, in spec order
    manager: Any  # lm-eval TaskManager over its own tasks and the task folders
    definitions: dict[str, str]  # request name -> what defines it (task folder digest, or lm-eval built-in)
    max_length: int
    batch_size: int
    models: dict[str, list[str] | None] = field(default_factory=dict)  # request name -> models; None: all

    def scores(self, request: str, label: str) -> bool:
        """Whether `label` (target-before, a variant, source:NAME) is to be scored on this task."""
        chosen = self.models.get(request)
        return chosen is None or label in chosen


def task_dir_paths(ctx: StageContext) -> list[Path]:
    """Local folders of evaluation.taskDirs, s3:// ones downloaded (again when their objects change)."""
    return [
        text_path(ctx, uri, f"evaluation.taskDirs[{i}]")
        for i, uri in enumerate(ctx.spec.evaluation.task_dirs)
    ]


def batch_size(spec: Any) -> int:
    """Sequences per lm-eval batch: the extraction token budget over the longest sequence (1 to 64)."""
    return max(1, min(64, spec.extraction.batch_tokens // spec.extraction.max_length))


def prepare_tasks(ctx: StageContext) -> TaskPlan | None:
    """The checked task plan, or None without evaluation.tasks. Raises StageError naming every bad field
    before anything is scored."""
    if not ctx.spec.evaluation.tasks:
        return None
    if installed_version() is None:
        raise StageError(
            f"evaluation.tasks needs lm-evaluation-harness: install FusionRun's eval extra (pip install "
            f"'lm-eval=={LM_EVAL_VERSION}'); the fusionrun-job image has it"
        )
    dirs = task_dir_paths(ctx)
    errors, index = dir_errors(list(dirs))
    reqs = requests(ctx.spec)
    builtin = needs_builtin([r.name for r in reqs], index)
    if not builtin:
        # Every task is local: no dataset lookups on the hub (which hang where there is no network).
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if not errors:
        manager = task_manager(dirs, builtin)
        errors = exact_errors(ctx.spec, manager)
    if errors:
        raise StageError(
            "evaluation tasks cannot be scored (nothing was scored; earlier scores are kept):\n  "
            + "\n  ".join(errors)
        )
    digests = {str(d): task_dir_digest(d) for d in dirs}
    definitions = {}
    for r in reqs:
        owner = next((d for d in reversed(dirs) if r.name in scan_task_dirs([d])), None)
        definitions[r.name] = (
            f"taskDir:{digests[str(owner)]}" if owner else f"lm-eval {installed_version()} built-in"
        )
    spec = ctx.spec
    models = {t.name: t.models for t in spec.evaluation.tasks}
    return TaskPlan(reqs, manager, definitions, spec.extraction.max_length, batch_size(spec), models)


def model_identity(ctx: StageContext, label: str) -> dict[str, Any]:
    """What decides a model's outputs: the trained weights' digests (fused, clm), else its spec entry; and
    the device and dtype it runs in."""
    spec = ctx.spec
    common = {"device": spec.extraction.device, "dtype": spec.extraction.dtype}
    trained = {t.variant or "fused": t for t in ctx.dag if t.stage is Stage.train}
    if label in trained:
        outputs = (read_manifest(ctx.store, trained[label]) or {}).get("outputs", {})
        prefix = Layout.model_prefix(label)
        return {
            "weights": {k: o["sha256"] for k, o in sorted(outputs.items()) if k.startswith(prefix)},
            **common,
        }
    name = spec.target.name if label == "target-before" else label.removeprefix("source:")
    m = spec.model(name).model_dump(mode="json", by_alias=True)
    return {
        "model": {k: m[k] for k in ("uri", "ggufFile", "tokenizer", "revision", "randomInit", "addBos")},
        **common,
    }


def settings_of(plan: TaskPlan, req: Any, add_bos: bool | None) -> dict[str, Any]:
    return {
        "name": req.name,
        "numFewshot": req.num_fewshot,
        "limit": req.limit,
        "definition": plan.definitions[req.name],
        "lmEval": installed_version(),
        "maxLength": plan.max_length,
        "batchSize": plan.batch_size,
        "scoring": SCORING,
        "addBos": add_bos,
    }


def score_key(identity: dict[str, Any], settings: dict[str, Any]) -> str:
    blob = json.dumps({"model": identity, "task": settings}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def read_scores(ctx: StageContext, label: str) -> dict[str, Any]:
    key = Layout.task_scores(label)
    if not ctx.store.exists(key):
        return {"model": label, "tasks": {}}
    try:
        doc = json.loads(ctx.store.get_bytes(key))
    except ValueError:
        return {"model": label, "tasks": {}}  # unreadable: rescored, then overwritten
    return (
        doc if isinstance(doc, dict) and isinstance(doc.get("tasks"), dict) else {"model": label, "tasks": {}}
    )


def score_model(
    ctx: StageContext, plan: TaskPlan, label: str, model: Any, tokenizer: Any, add_bos: bool | None
) -> dict[str, dict[str, Any]]:
    """Every requested task of one model: reused from the store when its key matches, else scored and
    written at once. Returns {request name: entry}."""
    doc = read_scores(ctx, label)
    identity = model_identity(ctx, label)
    lm = None
    out = {}
    for req in plan.requests:
        if not plan.scores(req.name, label):
            continue  # evaluation.tasks[].models leaves this model out
        settings = settings_of(plan, req, add_bos)
        key = score_key(identity, settings)
        entry = doc["tasks"].get(req.name)
        if entry is not None and entry.get("key") == key:
            log_event("benchmark", task=ctx.task.id, model=label, benchmark=req.name, reused=True)
        else:
            lm = lm or wrap_model(model, tokenizer, add_bos, plan.max_length, plan.batch_size)
            t0 = time.time()
            entry = {"key": key, "settings": settings, **score_task(lm, req, plan.manager)}
            entry["seconds"] = round(time.time() - t0, 2)
            doc["tasks"][req.name] = entry
            ctx.put_json(Layout.task_scores(label), doc)  # at once: a later failure keeps this score
            log_event(
                "benchmark",
                task=ctx.task.id,
                model=label,
                benchmark=req.name,
                reused=False,
                seconds=entry["seconds"],
            )
        out[req.name] = entry
    ctx.put_json(Layout.task_scores(label), doc)  # an output of this task (also when all reused)
    return out


# --------------------------------------------------------------------------------------------------
# The "tasks" block of evaluate/metrics.json (pure)


def tasks_block(requests: list[Any], scores: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Per lm-eval result (each requested task, and a group's subtasks): its settings, per model each metric
    with its stderr as lm-eval reports it, and FuseLLM minus each trained baseline (`fused_minus_clm`,
    `fused_minus_self`, `fused_minus_sources`) per metric with a 95% paired bootstrap interval over the
    documents (where each document's value is known)."""
    block: dict[str, Any] = {}
    for req in requests:
        for label, by_req in scores.items():
            entry = by_req.get(req.name)
            if entry is None:
                continue
            for name, result in entry["results"].items():
                b = block.setdefault(
                    name,
                    {
                        "requested_as": req.name,
                        "num_fewshot": entry.get("num_fewshot", {}).get(name, req.num_fewshot),
                        "limit": req.limit,
                        "samples": result.get("samples"),
                        "metric_names": result.get("metric_names") or list(result["metrics"]),
                        "higher_is_better": entry.get("higher_is_better", {}).get(name, {}),
                        "models": {},
                    },
                )
                b["models"][label] = result["metrics"]
        for name, b in block.items():
            if b["requested_as"] != req.name or "fused" not in b["models"]:
                continue
            for baseline in (v for v in BASELINES if v in b["models"]):
                docs = [scores[v][req.name].get("per_doc", {}).get(name, {}) for v in ("fused", baseline)]
                b[f"fused_minus_{baseline}"] = fused_minus(b["models"]["fused"], b["models"][baseline], *docs)
    return block


def fused_minus(
    fused: dict[str, Any], other: dict[str, Any], docs_f: dict[str, Any], docs_o: dict[str, Any]
) -> dict[str, Any]:
    """Per metric: FuseLLM's figure minus another model's, with a paired interval where it can be had."""
    out = {}
    for metric, fig in fused.items():
        a, b = fig.get("value"), other.get(metric, {}).get("value")
        if a is None or b is None:
            continue
        out[metric] = {"delta": round(a - b, 6), **paired_interval(docs_f, docs_o, metric, a)}
    return out


def paired_interval(docs_f: dict[str, Any], docs_c: dict[str, Any], metric: str, reported: float) -> dict:
    """The 95% paired bootstrap interval of the difference over the same documents; empty when the
    documents differ, a value is missing, or the per-document values do not give lm-eval's figure."""
    if not docs_f.get("doc_ids") or docs_f["doc_ids"] != docs_c.get("doc_ids"):
        return {}
    if metric not in docs_f or metric not in docs_c:
        return {}
    got = metric_from_docs(docs_f[metric], metric)
    if got is None or abs(got - reported) > 1e-6 * max(1.0, abs(reported)):
        return {}
    paired = paired_difference(docs_f[metric], docs_c[metric], metric)
    return {} if paired is None else {"ci95_low": round(paired[1], 6), "ci95_high": round(paired[2], 6)}


def main_metric(b: dict[str, Any]) -> str | None:
    """The first metric lm-eval reports for a result (its own order)."""
    return next(iter(b.get("metric_names") or []), None)


def task_summary(block: dict[str, Any], requests: list[Any]) -> dict[str, Any]:
    """Small, for FusionRun.status: per requested task its main metric for each model, and FuseLLM minus
    each trained baseline. The full table stays in evaluate/metrics.json and evaluate/tasks/ in the store."""
    out = {}
    for req in requests:
        b = block.get(req.name)
        metric = main_metric(b) if b else None
        if metric is None:
            continue
        row: dict[str, Any] = {"metric": metric}
        for label, figures in b["models"].items():
            value = figures.get(metric, {}).get("value")
            row[label] = None if value is None else round(value, 5)
        for baseline in BASELINES:
            diff = b.get(f"fused_minus_{baseline}", {}).get(metric)
            if diff is not None:
                row[f"fused_minus_{baseline}"] = diff["delta"]
        out[req.name] = row
    return out
