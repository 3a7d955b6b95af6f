"""Does fusing another model's knowledge beat plain continual training and self-distillation? Every number
of docs/results.md's evidence section, measured through the real pipeline.

    bash scripts/fetch-real-models.sh && make evidence-data
    .venv/bin/python -m bench.evidence                     # every run below that is not complete yet
    .venv/bin/python -m bench.evidence seed-1 mined        # a selection
    .venv/bin/python -m bench.evidence --table results.md  # the tables of what has run (markdown)
    .venv/bin/python -m bench.evidence --smoke             # tiny models (bench.smoke), checked
    .venv/bin/python -m bench.evidence top-k-128 --until align   # shards for bench.source_value only

The headline run is examples/evidence-pkg-code.yaml: FuseLLM and its three baselines (CLM-only,
self-distillation, the source alone) trained on the same blocks, in the same order, for the same steps with
the same seed and schedule, and every model scored on the held-out split of the training domain and on two
further held-out texts. Each other run is that FusionRun with a few fields changed (RUNS), under the name
`<base>-<run>` in the same store; its prepare, extract and align adopt the headline run's entries in the
store's shared cache (jobs.cache): nothing is extracted twice. Checkpoints of finished runs are deleted.

Comparisons are paired per held-out document (the same documents in every run): within a run FuseLLM
against each baseline (evaluate's fused_minus_*), across runs FuseLLM against FuseLLM (alignment, fusion
settings) with fusion.evaluate.paired_bpb_difference.

`--smoke` runs the same code on the tiny base (bench.smoke; or --base) with the runs named (default:
token-level), and fails unless the tables have a section per run and each run's comparisons with the
headline's baselines.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.ablation import _json, absolute_document, deep_merge
from fusion.uris import local_path
from jobs.cache import located
from jobs.complete import read_manifest
from jobs.registry import BASELINES, STAGE_NAMES, Layout, Stage, Task, Variant
from jobs.spec import parse_fusionrun
from jobs.store import LocalStore

ROOT = Path(__file__).resolve().parent.parent
BASE_SPEC = ROOT / "examples" / "evidence-pkg-code.yaml"
ALL_BASELINES = {"clmBaseline": True, "selfDistillBaseline": True, "sourcesOnlyBaseline": True}
NO_BASELINES = {"clmBaseline": False, "selfDistillBaseline": False, "sourcesOnlyBaseline": False}
LIGHT_EVAL = {"evaluateSources": False, "tasks": [], "taskDirs": []}  # the headline run scores those

# The two-source runs (FuseChat-style experts made by FusionRun itself): a code expert (the headline's
# CLM-only model: SmolLM2 trained on the package code) and a prose expert (run `expert-prose`: SmolLM2
# trained on the Debian Developer's Reference), fused into SmolLM2 on both texts (code-prose.jsonl), each
# expert alone and both, scored on held-out code and prose nobody trained on. "{store}" and "{base}" in a
# value are the store's folder and the headline run's name.
GENERATED = ROOT / "examples" / "data" / "generated"
CODE_EXPERT = {"name": "code", "uri": f"{{store}}/{{base}}/{Layout.model_prefix(Variant.clm.value)}"}
PROSE_EXPERT = {"name": "prose", "uri": f"{{store}}/{{base}}-expert-prose/{Layout.model_prefix(None)}"}
HELDOUT_TEXTS = [  # the unseen ones: documents of each expert's domain that no model trained on
    {"name": "code-unseen", "uri": str(GENERATED / "code-unseen.jsonl"), "format": "jsonl"},
    {"name": "prose-unseen", "uri": str(GENERATED / "prose-unseen.jsonl"), "format": "jsonl"},
    {"name": "stdlib-code", "uri": str(ROOT / "examples" / "data" / "stdlib-code.txt")},
    {"name": "debian-faq", "uri": str(GENERATED / "debian-faq.txt")},
    {"name": "debian-reference", "uri": str(GENERATED / "debian-reference.txt")},
]
CODE_PROSE = {"uri": str(GENERATED / "code-prose.jsonl"), "format": "jsonl"}
TWO_SOURCE_RUNS = ("expert-prose", "two-experts", "code-expert", "prose-expert")  # in the order they need

# run -> (what it measures, overrides of the headline FusionRun, camelCase as in the YAML)
RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    # The second seed and the one-pass budget repeat both headline comparisons (CLM-only and
    # self-distillation); the source alone is scored in the headline run.
    "seed-1": (
        "the headline with seed 1 (data order, initial state of training)",
        {"training": {"seed": 1, "sourcesOnlyBaseline": False}},
    ),
    "one-epoch": (
        "one pass over the training split (the paper's budget)",
        {"training": {"maxSteps": 17, "sourcesOnlyBaseline": False}},
    ),
    "one-epoch-seed-1": (
        "one pass, seed 1",
        {"training": {"maxSteps": 17, "seed": 1, "sourcesOnlyBaseline": False}},
    ),
    "mined": (
        "the paper's alignment (DTW + MinED), everything else as the headline",
        {"alignment": {"method": "mined", "projection": "spelling"}, "training": NO_BASELINES},
    ),
    "paper-fusion": (
        "the paper's alignment and fusion choices (MinED; CE on each model's own tokens; one-hot fallback)",
        {
            "alignment": {"method": "mined", "projection": "spelling"},
            "fusion": {"ceOn": "own", "fallback": "onehot"},
            "training": NO_BASELINES,
        },
    ),
    "exact-paper-fusion": (
        "exact + continuation with the paper's fusion choices (CE on each model's own tokens; one-hot "
        "fallback): the defaults since the alignment decision",
        {"fusion": {"ceOn": "own", "fallback": "onehot"}, "training": NO_BASELINES},
    ),
    "spelling": (
        "exact alignment, each source token projected onto the target token that spells it first",
        {"alignment": {"projection": "spelling"}, "training": NO_BASELINES},
    ),
    "token-level": (
        "MinCE per token (the candidate with most mass on each gold token), the rest as the headline",
        {"fusion": {"level": "token"}, "training": NO_BASELINES},
    ),
    "top-k-128": (
        "k = 128 entries per position (bench.source_value's best teacher), with its own self-distillation at "
        "k = 128 (CLM-only does not depend on k: the headline's)",
        {"extraction": {"topK": 128}, "training": {"clmBaseline": False, "sourcesOnlyBaseline": False}},
    ),
    "lambda-ramp": (
        "lambda from 0.5 at the first step to 1.0 at the last (training.lambdaFinal: the teacher early, the "
        "data late), with its own self-distillation on the same schedule (CLM-only: the headline's)",
        {"training": {"lambdaFinal": 1.0, "clmBaseline": False, "sourcesOnlyBaseline": False}},
    ),
    "lambda-0p9": (
        "lambda 0.9 (the paper's), with its own self-distillation (CLM-only has lambda 1: the headline's)",
        {"training": {"lambda": 0.9, "clmBaseline": False, "sourcesOnlyBaseline": False}},
    ),
    "large-tasks": (
        "the headline's FuseLLM, CLM-only and self-distillation (trained again: the same weights, bit for "
        "bit) scored on pkg_docname (3,000 items of code) and pkg_nextsentence (2,000 of prose), text no "
        "model trained on (examples/tasks-pkg), FuseLLM minus each baseline paired per item",
        {
            "training": {"sourcesOnlyBaseline": False},
            "evaluation": {
                "corpora": [],
                "taskDirs": [str(ROOT / "examples" / "tasks-pkg")],
                "tasks": [
                    {"name": "pkg_docname", "models": ["fused", "clm", "self"]},
                    {"name": "pkg_nextsentence", "models": ["fused", "clm", "self"]},
                ],
            },
        },
    ),
    "expert-prose": (
        "the prose expert of the two-source runs: SmolLM2 trained on the Debian Developer's Reference with "
        "lambda 1 (the CLM objective alone; the code expert stands in as the unused teacher)",
        {
            "sources": [CODE_EXPERT],
            "corpus": {"uri": str(GENERATED / "dev-reference.jsonl"), "format": "jsonl"},
            "training": {"lambda": 1.0, **NO_BASELINES},
            "evaluation": {"corpora": HELDOUT_TEXTS},
        },
    ),
    "two-experts": (
        "both experts (code, prose) fused into SmolLM2 on code and prose, with CLM-only on the same text; "
        "each expert scored on its own",
        {
            "sources": [CODE_EXPERT, PROSE_EXPERT],
            "corpus": CODE_PROSE,
            "training": {**NO_BASELINES, "clmBaseline": True},
            "evaluation": {"corpora": HELDOUT_TEXTS, "evaluateSources": True},
        },
    ),
    "code-expert": (
        "the code expert alone, the rest as two-experts",
        {
            "sources": [CODE_EXPERT],
            "corpus": CODE_PROSE,
            "training": NO_BASELINES,
            "evaluation": {"corpora": HELDOUT_TEXTS},
        },
    ),
    "prose-expert": (
        "the prose expert alone, the rest as two-experts",
        {
            "sources": [PROSE_EXPERT],
            "corpus": CODE_PROSE,
            "training": NO_BASELINES,
            "evaluation": {"corpora": HELDOUT_TEXTS},
        },
    ),
}


def placed(value: Any, store_root: Path, base: str) -> Any:
    """`value` with "{store}" and "{base}" in its strings replaced (the expert models' folders)."""
    if isinstance(value, dict):
        return {k: placed(v, store_root, base) for k, v in value.items()}
    if isinstance(value, list):
        return [placed(v, store_root, base) for v in value]
    if isinstance(value, str):
        return value.replace("{store}", str(store_root)).replace("{base}", base)
    return value


def run_document(base_doc: dict[str, Any], run: str, store_root: Path) -> dict[str, Any]:
    base = base_doc["metadata"]["name"]
    over = placed(RUNS[run][1], store_root, base)
    spec = deep_merge(deep_merge(base_doc["spec"], {"evaluation": LIGHT_EVAL}), over)
    name = f"{base}-{run}"
    return {
        "apiVersion": base_doc["apiVersion"],
        "kind": "FusionRun",
        "metadata": {"name": name},
        "spec": spec,
    }


def fusionrun(path: Path, until: str | None = None) -> int:
    command = [sys.executable, "-m", "jobs.cli", "run", str(path), *(["--until", until] if until else [])]
    print(f"    {' '.join(command)}", flush=True)
    return subprocess.call(command, cwd=ROOT)


def run_one(base_doc: dict[str, Any], store_root: Path, run: str, until: str | None = None) -> int:
    doc = run_document(base_doc, run, store_root)
    parse_fusionrun(doc)  # a bad override fails here, naming the field
    folder = store_root / "evidence-specs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{doc['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    print(f"\n=== {run}: {RUNS[run][0]}", flush=True)
    rc = fusionrun(path, until)
    if rc == 0:  # the exported models, metrics and manifests stay; checkpoints (GBs) go
        for ckpt in (store_root / doc["metadata"]["name"]).glob(Layout.checkpoints("*")):
            shutil.rmtree(ckpt, ignore_errors=True)
    return rc


# --------------------------------------------------------------------------------------------------
# Tables

LABELS = {
    "target-before": "SmolLM2 before training",
    "clm": "CLM-only",
    "self": "self-distillation",
    "sources": "source only",
    "fused": "FuseLLM",
}


def models_of(metrics: dict[str, Any], text: str) -> dict[str, Any]:
    if text == "heldout":
        return metrics.get("models", {})
    return metrics.get("corpora", {}).get(text, {}).get("models", {})


def paired(a: dict[str, Any] | None, b: dict[str, Any] | None) -> tuple[float, float, float] | None:
    """a minus b in bits per byte with its 95% paired bootstrap interval over the held-out documents."""
    from fusion.evaluate import paired_bpb_difference

    if not a or not b or len(a.get("doc_bits", [])) != len(b.get("doc_bits", [])):
        return None
    return paired_bpb_difference(np.array(a["doc_bits"]), np.array(b["doc_bits"]), np.array(a["doc_bytes"]))


def fmt(d: tuple[float, float, float] | None) -> str:
    return "-" if d is None else f"{d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]"


def run_table(metrics: dict[str, Any], text: str) -> list[str]:
    """One held-out text of one run: every model's bits/byte and perplexity, FuseLLM minus each baseline."""
    models = models_of(metrics, text)
    order = [k for k in LABELS if k in models] + sorted(k for k in models if k not in LABELS)
    lines = ["| model | bits/byte | perplexity (own tokens) |", "|---|---|---|"]
    for k in order:
        m = models[k]
        name = LABELS.get(k, k.removeprefix("source:") + " (source, own tokenization)")
        lines.append(f"| {name} | {m['bits_per_byte']:.4f} | {m['perplexity']:.3f} |")
    lines += [
        "",
        "| comparison | bits/byte difference [95% paired bootstrap CI] | perplexity change |",
        "|---|---|---|",
    ]
    for b in BASELINES:
        if "fused" in models and b in models:
            change = models["fused"]["perplexity"] / models[b]["perplexity"] - 1
            lines.append(
                f"| FuseLLM minus {LABELS[b]} | {fmt(paired(models['fused'], models[b]))} | {change:+.1%} |"
            )
    return [*lines, ""]


def task_table(metrics: dict[str, Any], run_dir: Path) -> list[str]:
    """Each lm-eval task a run scored: every model's figures (lm-eval's stderr beside), then FuseLLM minus
    each baseline (task_comparisons)."""
    lines: list[str] = []
    for name, b in (metrics.get("tasks") or {}).items():
        names = [m for m in b.get("metric_names") or [] if m in ("acc", "acc_norm")]
        lines += [f"### task {name}, {b.get('samples')} items", "", "| model | " + " | ".join(names) + " |"]
        lines.append("|---|" + "---|" * len(names))
        for k in (k for k in LABELS if k in b["models"]):
            cells = [_with_stderr(b["models"][k].get(m, {})) for m in names]
            lines.append(f"| {LABELS[k]} | " + " | ".join(cells) + " |")
        lines += ["", *task_comparisons(b, name, names, run_dir), ""]
    return lines


def task_comparisons(b: dict[str, Any], name: str, metrics: list[str], run_dir: Path) -> list[str]:
    """FuseLLM minus each baseline with evaluate's 95% paired interval over the items, and the share of
    items the two models answer differently (what sets the interval's width: about 1.96 sqrt(share / N))."""
    lines = ["| comparison | metric | difference [95% paired bootstrap CI] | items answered differently |"]
    lines.append("|---|---|---|---|")
    for base in BASELINES:
        for m in metrics:
            d = b.get(f"fused_minus_{base}", {}).get(m)
            if d is None:
                continue
            ci = f" [{d['ci95_low']:+.4f}, {d['ci95_high']:+.4f}]" if "ci95_low" in d else " (no interval)"
            differ = item_disagreement(run_dir, b["requested_as"], name, m, base)
            share = "-" if differ is None else f"{differ:.1%}"
            lines.append(f"| FuseLLM minus {LABELS[base]} | {m} | {d['delta']:+.4f}{ci} | {share} |")
    return lines


def _with_stderr(figure: dict[str, Any]) -> str:
    value, err = figure.get("value"), figure.get("stderr")
    if value is None:
        return "-"
    return f"{value:.4f} ± {err:.4f}" if isinstance(err, int | float) else f"{value:.4f}"


def item_disagreement(run_dir: Path, requested: str, name: str, metric: str, baseline: str) -> float | None:
    """The share of a task's items on which FuseLLM's per-item value differs from the baseline's (from the
    scores evaluate keeps per model); None where either model's per-item values are not kept."""
    per_item = []
    for label in ("fused", baseline):
        doc = _json(run_dir / Layout.task_scores(label)) or {}
        per_doc = doc.get("tasks", {}).get(requested, {}).get("per_doc", {}).get(name, {})
        per_item.append(per_doc.get(metric))
    a, b = per_item
    if a is None or b is None or len(a) != len(b) or not a:
        return None
    return float(np.mean(np.asarray(a) != np.asarray(b)))


def cross_run(
    metrics: dict[str, dict[str, Any]], text: str, a: str, b: str, model: str = "fused", model_b: str = ""
) -> tuple[float, float, float] | None:
    """`model` of run a minus `model_b` (default: the same model) of run b, the same held-out documents,
    paired. Runs share blocks, order, seed and schedule, and training is deterministic here, so a run that
    changes only fusion compares with the headline's baselines."""
    if a not in metrics or b not in metrics:
        return None
    return paired(models_of(metrics[a], text).get(model), models_of(metrics[b], text).get(model_b or model))


# Runs that train without their own baseline, and the headline baseline that is theirs: the same blocks,
# order, seed and schedule, and a baseline these runs' changes do not touch (fusion settings do not change
# CLM-only or self-distillation; lambda does not change CLM-only).
HEADLINE_BASELINES = [
    *(
        (run, b)
        for run in ("token-level", "mined", "paper-fusion", "exact-paper-fusion")
        for b in ("self", "clm")
    ),
    ("lambda-0p9", "clm"),
    ("lambda-ramp", "clm"),
    ("top-k-128", "clm"),
]


def tables(store_root: Path, base: str) -> str:
    names = {"headline": base, **{r: f"{base}-{r}" for r in RUNS}}
    metrics = {r: m for r, n in names.items() if (m := _json(store_root / n / Layout.METRICS))}
    out = []
    for run, m in metrics.items():
        texts = ["heldout", *m.get("corpora", {})]
        out += [f"## {run}: {RUNS[run][0] if run in RUNS else 'examples/evidence-pkg-code.yaml'}", ""]
        for text in texts:
            out += [f"### {text}", "", *run_table(m, text)]
        out += task_table(m, store_root / names[run])
    out += [
        "## Across runs (FuseLLM, the same held-out documents)",
        "",
        "| comparison | " + " | ".join(["heldout", *metrics.get("headline", {}).get("corpora", {})]) + " |",
    ]
    texts = ["heldout", *metrics.get("headline", {}).get("corpora", {})]
    out.append("|---|" + "---|" * len(texts))
    for a, b, what in (
        ("headline", "spelling", "continuation projection minus the spelling projection (exact alignment)"),
        ("headline", "mined", "exact alignment minus MinED (same fusion settings)"),
        (
            "mined",
            "paper-fusion",
            "CE on the target's tokens + target fallback minus the paper's choices (MinED)",
        ),
        ("headline", "paper-fusion", "everything the diagnostics called for minus the paper's pipeline"),
        (
            "headline",
            "exact-paper-fusion",
            "CE on the target's tokens + target fallback minus the paper's choices (exact + continuation)",
        ),
        (
            "exact-paper-fusion",
            "paper-fusion",
            "exact + continuation minus MinED (the paper's fusion choices)",
        ),
        ("token-level", "headline", "MinCE per token minus per document (exact + continuation)"),
        ("top-k-128", "headline", "k = 128 minus k = 10"),
        ("lambda-ramp", "headline", "lambda 0.5 -> 1.0 minus lambda 0.5"),
    ):
        out += _row(what, [cross_run(metrics, t, a, b) for t in texts])
    for run, b in HEADLINE_BASELINES:
        what = f"{run} FuseLLM minus the headline's {LABELS[b]}"
        out += _row(what, [cross_run(metrics, t, run, "headline", "fused", b) for t in texts])
    out += two_source_tables(store_root, base, metrics)
    return "\n".join(out) + "\n"


# (run a, model of a, run b, model of b, what): the two-source comparisons, all on code-prose.jsonl
TWO_SOURCE_ROWS = [
    ("two-experts", "fused", "code-expert", "fused", "both experts minus the code expert alone"),
    ("two-experts", "fused", "prose-expert", "fused", "both experts minus the prose expert alone"),
    ("two-experts", "fused", "two-experts", "clm", "both experts minus CLM-only"),
    ("code-expert", "fused", "two-experts", "clm", "the code expert alone minus CLM-only"),
    ("prose-expert", "fused", "two-experts", "clm", "the prose expert alone minus CLM-only"),
]


def two_source_tables(store_root: Path, base: str, metrics: dict[str, dict[str, Any]]) -> list[str]:
    """FuseLLM with both experts against each expert alone and CLM-only (paired per held-out document), and
    which candidate MinCE picked in each domain of the training text."""
    if "two-experts" not in metrics:
        return []
    # code-prose.jsonl's own held-out split is left out: the experts trained on some of its documents
    texts = list(metrics["two-experts"].get("corpora", {}))
    out = ["", "## Two sources (FuseLLM, the same held-out documents)", ""]
    out += ["| comparison | " + " | ".join(texts) + " |", "|---|" + "---|" * len(texts)]
    for a, ma, b, mb, what in TWO_SOURCE_ROWS:
        out += _row(what, [cross_run(metrics, t, a, b, ma, mb) for t in texts])
    out += ["", "### Bits per byte on the training text, per domain (each model on its own tokens)", ""]
    out += ["| domain | SmolLM2 | code expert | prose expert |", "|---|---|---|---|"]
    bpb = domain_bits_per_byte(
        store_root / f"{base}-two-experts", GENERATED / "code-prose.jsonl", ["smollm2", "code", "prose"]
    )
    for domain, by in sorted(bpb.items()):
        out.append(
            f"| {domain} | "
            + " | ".join(f"{by[m]:.4f}" if m in by else "-" for m in ("smollm2", "code", "prose"))
            + " |"
        )
    out += ["", "### What MinCE picked, per domain of the training text (documents)", ""]
    out += ["| run | domain | " + " | ".join(["target", "code", "prose"]) + " |", "|---|---|---|---|---|"]
    for run in ("two-experts", "code-expert", "prose-expert"):
        picks = domain_picks(store_root / f"{base}-{run}", GENERATED / "code-prose.jsonl")
        for domain, counts in sorted(picks.items()):
            cells = [str(counts.get(c, "-")) for c in ("smollm2", "code", "prose")]
            out.append(f"| {run} | {domain} | " + " | ".join(cells) + " |")
    return [*out, ""]


def stored_path(run_dir: Path, task: Task, key: str) -> Path | None:
    """The file of `task`'s output `key` in the local run folder `run_dir`, in the shared cache when its
    manifest points there (jobs.cache.located, as the stages read it); None without a manifest."""
    store = LocalStore(run_dir)
    manifest = read_manifest(store, task)
    if manifest is None:
        return None
    where, physical = located(store, manifest, key)
    return where.local_path(physical)


def document_domains(run_dir: Path, corpus: Path) -> list[dict[int, str]]:
    """Per training shard, {prepared document id: its domain}: that of the corpus record it came from
    (`domain`). Empty when the run has not prepared or the corpus is not here."""
    from fusion.format import read_shard
    from jobs.corpus import unpack_texts

    prepare = read_manifest(LocalStore(run_dir), Task(stage=Stage.prepare))
    if not prepare or not corpus.is_file():
        return []
    records = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines() if line]
    domains = [r.get("domain", "?") for r in records]
    out = []
    for s in range(prepare["summary"]["shards"]):
        docs = read_shard(stored_path(run_dir, Task(stage=Stage.prepare), Layout.documents(s)))
        texts = unpack_texts(docs["text"], docs["doc_offsets"])
        out.append(
            {
                i: _domain_of(t, records, domains)
                for i, t in zip(docs["doc_index"].tolist(), texts, strict=True)
            }
        )
    return out


def domain_picks(run_dir: Path, corpus: Path) -> dict[str, dict[str, int]]:
    """{domain: {candidate: documents (or positions) MinCE picked it for}} over the FuseLLM fuse shards."""
    from fusion.format import read_shard

    out: dict[str, dict[str, int]] = {}
    for s, domain_of in enumerate(document_domains(run_dir, corpus)):
        fused = read_shard(run_dir / Layout.shard(Task(stage=Stage.fuse, shard=s)))
        doc_domain = [domain_of[i] for i in fused["doc_index"].tolist()]
        choice = np.asarray(fused["choice"])
        if len(choice) != len(doc_domain):  # token level: one choice per position
            doc_domain = np.repeat(doc_domain, np.diff(np.asarray(fused["doc_offsets"]))).tolist()
        for domain, pick in zip(doc_domain, choice.tolist(), strict=True):
            if pick >= 0:
                name = fused.meta["candidates"][pick]
                out.setdefault(domain, {})[name] = out.setdefault(domain, {}).get(name, 0) + 1
    return out


def domain_bits_per_byte(run_dir: Path, corpus: Path, models: list[str]) -> dict[str, dict[str, float]]:
    """{domain: {model: bits per byte}} of each model on the run's training documents, from its extract
    shards (each model on its own tokens): what MinCE compares, per domain."""
    from fusion.format import read_shard

    sums: dict[str, dict[str, list[float]]] = {}
    for s, domain_of in enumerate(document_domains(run_dir, corpus)):
        for model in models:
            task = Task(stage=Stage.extract, model=model, shard=s)
            path = stored_path(run_dir, task, Layout.shard(task))
            if path is None:
                continue
            ex = read_shard(path)
            nll, nbytes = np.asarray(ex["doc_nll"]), np.asarray(ex["doc_pred_nbytes"])
            for j, i in enumerate(ex["doc_index"].tolist()):
                acc = sums.setdefault(domain_of[i], {}).setdefault(model, [0.0, 0.0])
                acc[0], acc[1] = acc[0] + float(nll[j]), acc[1] + float(nbytes[j])
    return {d: {m: nb[0] / np.log(2) / nb[1] for m, nb in by.items() if nb[1]} for d, by in sums.items()}


def _domain_of(text: str, records: list[dict[str, Any]], domains: list[str]) -> str:
    """The domain of the record a prepared document is (or, cut, is a piece of)."""
    for r, d in zip(records, domains, strict=True):
        if text == r["text"] or text in r["text"]:
            return d
    return "?"


def _row(what: str, cells: list[tuple[float, float, float] | None]) -> list[str]:
    """A table row, or none when no run it compares has run."""
    return [f"| {what} | " + " | ".join(map(fmt, cells)) + " |"] if any(cells) else []


def plot(store_root: Path, base: str, path: Path) -> bool:
    """FuseLLM minus each baseline per held-out text, with its 95% paired interval, for every run that
    trained that baseline (the headline, the second seed): one panel per baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"headline": base, **{r: f"{base}-{r}" for r in RUNS}}
    metrics = {r: m for r, n in names.items() if (m := _json(store_root / n / Layout.METRICS))}
    if "headline" not in metrics:
        return False
    texts = ["heldout", *metrics["headline"].get("corpora", {})]
    baselines = [b for b in ("clm", "self") if b in models_of(metrics["headline"], "heldout")]
    fig, axes = plt.subplots(1, len(baselines), figsize=(6.2 * len(baselines), 3.4), squeeze=False)
    for ax, b in zip(axes[0], baselines, strict=True):
        runs = [
            r
            for r in metrics
            if b in models_of(metrics[r], "heldout") and "fused" in models_of(metrics[r], "heldout")
        ]
        width = 0.8 / max(len(runs), 1)
        for i, r in enumerate(runs):
            d = [
                paired(models_of(metrics[r], t).get("fused"), models_of(metrics[r], t).get(b)) for t in texts
            ]
            x = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(texts))]
            mid = [v[0] if v else np.nan for v in d]
            err = [[v[0] - v[1] if v else 0 for v in d], [v[2] - v[0] if v else 0 for v in d]]
            ax.bar(x, mid, width, yerr=err, capsize=3, label=r)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(texts)), texts)
        ax.set_title(f"FuseLLM minus {LABELS[b]}")
        ax.set_ylabel("bits/byte (negative: FuseLLM better)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # off the bars
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


SMOKE_RUNS = ["token-level"]  # fusion changes, no baseline of its own: compared with the headline's


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", help=f"a selection of {list(RUNS)} (default: every one not done)")
    ap.add_argument("--base", type=Path, help=f"the headline FusionRun (default {BASE_SPEC.name})")
    ap.add_argument("--table", type=Path, help="only write the tables of what has run to this file")
    ap.add_argument("--plot", type=Path, help="with --table: also plot FuseLLM minus each baseline (PNG)")
    ap.add_argument("--smoke", action="store_true", help=f"the tiny base (bench.smoke), {SMOKE_RUNS}")
    ap.add_argument(
        "--until",
        choices=STAGE_NAMES[: STAGE_NAMES.index(Stage.fuse.value) + 1],
        help="stop every run (the headline too) after this stage: the inputs of bench.source_value",
    )
    args = ap.parse_args(argv)
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown:
        ap.error(f"unknown run(s) {unknown}; choose from {list(RUNS)}")
    if not args.smoke:
        return evidence(args, args.base or BASE_SPEC, args.runs)
    with tempfile.TemporaryDirectory(prefix="bench-evidence-smoke-") as tmp:
        from bench.smoke import write_tiny_base

        return evidence(args, args.base or write_tiny_base(Path(tmp)), args.runs or SMOKE_RUNS)


def evidence(args: argparse.Namespace, base_spec: Path, runs: list[str]) -> int:
    base_doc = absolute_document(base_spec)  # run documents are written elsewhere
    store_root = local_path(base_doc["spec"]["store"]["uri"])
    base = base_doc["metadata"]["name"]
    if args.table:
        if args.plot and plot(store_root, base, args.plot):
            print(f"plot: {args.plot}")
        args.table.write_text(tables(store_root, base))
        print(args.table.read_text())
        return 0
    if fusionrun(base_spec, args.until) != 0:
        return 1
    todo = runs or [r for r in RUNS if not (store_root / f"{base}-{r}" / Layout.METRICS).is_file()]
    failed = []
    for r in todo:
        t = time.time()
        rc = run_one(base_doc, store_root, r, args.until)
        print(f"=== {r}: exit {rc} after {time.time() - t:.0f} s", flush=True)
        failed += [r] if rc else []
    if args.until:
        return 1 if failed else 0
    text = tables(store_root, base)
    print(text)
    if args.smoke:
        failed += smoke_problems(text, todo)
    return 1 if failed else 0


def smoke_problems(text: str, runs: list[str]) -> list[str]:
    """A section per run (and the headline), and each run's rows against the headline's baselines."""
    out = [f"no section for {r}" for r in ["headline", *runs] if f"\n## {r}: " not in f"\n{text}"]
    for run, b in HEADLINE_BASELINES:
        row = f"| {run} FuseLLM minus the headline's {LABELS[b]} |"
        if run in runs and row not in text:
            out.append(f"no row {row}")
    for problem in out:
        print(f"FAILED: {problem}", file=sys.stderr)
    return out


if __name__ == "__main__":
    sys.exit(main())
