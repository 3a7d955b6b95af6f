"""The fusion ablation table (docs/results.md): variants of the real-model evidence run, each a real
`fusionrun run` of its own FusionRun, on the same data, steps and schedule.

    bash scripts/fetch-real-models.sh
    .venv/bin/python -m jobs.cli run examples/real-smollm2-gemma.yaml     # the base run (~40 min)
    .venv/bin/python -m bench.ablation                                   # every variant below
    .venv/bin/python -m bench.ablation lambda-0p5 avgce                  # a selection
    .venv/bin/python -m bench.ablation --table                           # print the table only
    .venv/bin/python -m bench.ablation --smoke                           # tiny models (bench.smoke)

A variant is the base FusionRun with a few fields changed (VARIANTS), run under the name
`<base>-<variant>` in the same store. Its prepare, extract and align tasks have the base run's content
keys, so they adopt the base run's entries in the store's shared cache (jobs.cache) and nothing is
extracted again; what the variant changes (fusion settings, training) runs.

Each variant trains the FuseLLM model only, unless it sets training.clmBaseline (the seed replicates and
the longer schedule train their own CLM-only baseline with the same settings). Sources are scored once, by
the base run. Training checkpoints of finished variants are deleted (about 4 GB each); the exported model,
the manifests, metrics and logs stay.

`--smoke` runs the same code on the tiny base (bench.smoke; or --base, run first if it is not complete) with
the variants named (default: topk-3), and fails unless the table has the base's row and each variant's,
each with its FuseLLM minus CLM-only difference.
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

from fusion.uris import is_s3, local_path
from jobs.registry import Layout, Stage, Task
from jobs.spec import SpecError, load_fusionrun, parse_fusionrun

ROOT = Path(__file__).resolve().parent.parent
BASE_SPEC = ROOT / "examples" / "real-smollm2-gemma.yaml"

# name -> (what it tests, overrides of the base spec, camelCase as in the YAML)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "lambda-0p5": ("lambda 0.5 (the fusion loss weighs as much as CLM)", {"training": {"lambda": 0.5}}),
    "avgce": ("AvgCE instead of MinCE", {"fusion": {"strategy": "avgCE"}}),
    "token-level": ("MinCE per position instead of per document", {"fusion": {"level": "token"}}),
    "ce-per-token": ("MinCE on per-token CE (the reference's unit)", {"fusion": {"ceUnit": "token"}}),
    "no-target": (
        "Gemma alone as the fusion candidate (target not a candidate)",
        {"fusion": {"includeTarget": False}},
    ),
    "topk-3": ("k = 3 entries per candidate", {"fusion": {"topK": 3}}),
    "seed-1": (
        "seed 1 (data order), with its own CLM-only baseline",
        {"training": {"seed": 1, "clmBaseline": True}},
    ),
    "seed-2": (
        "seed 2 (data order), with its own CLM-only baseline",
        {"training": {"seed": 2, "clmBaseline": True}},
    ),
    "paper-lr": (
        "lr 1e-5 (the paper's), with its own CLM-only baseline: the model moves less from where "
        "the fusion targets are",
        {"training": {"learningRate": 0.00001, "clmBaseline": True}},
    ),
    "long": (
        "2 epochs (70 steps) at lr 3e-4, with its own CLM-only baseline",
        {"training": {"maxSteps": 70, "learningRate": 0.0003, "clmBaseline": True}},
    ),
    "long-seed-1": (
        "the long schedule with seed 1, with its own CLM-only baseline",
        {"training": {"maxSteps": 70, "learningRate": 0.0003, "seed": 1, "clmBaseline": True}},
    ),
    "long-lambda-0p5": (
        "the long schedule with lambda 0.5 (compared with the long CLM-only baseline)",
        {"training": {"maxSteps": 70, "learningRate": 0.0003, "lambda": 0.5}},
    ),
}
# A variant without a CLM-only baseline of its own is compared with the base run's, or with this one's
# (same training schedule and seed).
CLM_FROM: dict[str, str] = {"long-lambda-0p5": "long"}


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def absolute_document(path: Path | str) -> dict[str, Any]:
    """A FusionRun file as a document with its local URIs made absolute (variants are written elsewhere)."""
    run = load_fusionrun(path)
    return {
        "apiVersion": run.api_version,
        "kind": "FusionRun",
        "metadata": {"name": run.metadata.name},
        "spec": run.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
    }


def variant_document(base_doc: dict[str, Any], variant: str) -> dict[str, Any]:
    """The variant's FusionRun document: the base one (paths resolved) with the variant's overrides, its
    own name, one checkpoint at the end (disk), no baseline but those it sets, and no re-scoring of the
    sources (the base run did that)."""
    _, over = VARIANTS[variant]
    off = {"clmBaseline": False, "selfDistillBaseline": False, "sourcesOnlyBaseline": False}
    common = {
        "training": {**off, "checkpointInterval": 1000},
        "evaluation": {"evaluateSources": False},
    }
    spec = deep_merge(deep_merge(base_doc["spec"], common), over)
    return {
        "apiVersion": base_doc["apiVersion"],
        "kind": "FusionRun",
        "metadata": {"name": f"{base_doc['metadata']['name']}-{variant}"},
        "spec": spec,
    }


def run_variant(base_doc: dict[str, Any], store_root: Path, variant: str, out_dir: Path) -> int:
    doc = variant_document(base_doc, variant)
    try:
        parse_fusionrun(doc)  # a bad override fails here, naming the field
    except SpecError as err:
        print(f"=== {variant}: {err}", file=sys.stderr, flush=True)
        return 1
    name = doc["metadata"]["name"]
    path = out_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    print(f"\n=== {variant}: {VARIANTS[variant][0]}\n    {sys.executable} -m jobs.cli run {path}", flush=True)
    rc = subprocess.call([sys.executable, "-m", "jobs.cli", "run", str(path)], cwd=ROOT)
    if rc == 0:
        for ckpt in (store_root / name).glob(Layout.checkpoints("*")):
            shutil.rmtree(ckpt, ignore_errors=True)
    return rc


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _models(metrics: dict[str, Any], text: str) -> dict[str, Any]:
    if text == "heldout":
        return metrics.get("models", {})
    return metrics.get("corpora", {}).get(text, {}).get("models", {})


def _difference(
    fused: dict[str, Any] | None, clm: dict[str, Any] | None
) -> tuple[float, float, float] | None:
    """FuseLLM minus CLM-only in bits per byte, with its 95% paired bootstrap interval over documents."""
    from fusion.evaluate import paired_bpb_difference

    if not fused or not clm or "doc_bits" not in fused or "doc_bits" not in clm:
        return None
    return paired_bpb_difference(
        np.array(fused["doc_bits"]), np.array(clm["doc_bits"]), np.array(fused["doc_bytes"])
    )


def fuse_manifests(run_dir: Path) -> list[Path]:
    """The manifests of a run's FuseLLM fuse tasks, one per shard (its recorded spec says how many)."""
    shards = _json(run_dir / Layout.SPEC).get("extraction", {}).get("shards", 0)
    return [run_dir / Layout.manifest(Task(Stage.fuse, shard=s)) for s in range(shards)]


def row(
    store_root: Path,
    name: str,
    label: str,
    base_clm: dict[str, Any] | None = None,
    texts: tuple[str, ...] = ("heldout",),
) -> dict[str, Any] | None:
    """One line of the table: FuseLLM and CLM-only (the run's own, else the base run's) on each text."""
    metrics = _json(store_root / name / Layout.METRICS)
    if not metrics.get("models"):
        return None
    picks: dict[str, int] = {}
    for m in fuse_manifests(store_root / name):
        for k, v in _json(m).get("summary", {}).get("choice_counts", {}).items():
            picks[k] = picks.get(k, 0) + v
    total = sum(picks.values())
    out: dict[str, Any] = {
        "variant": label,
        "clm_is_own": "clm" in metrics["models"],
        "picks": ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in picks.items()) if total else "-",
    }
    for text in texts:
        models = _models(metrics, text)
        clm = models.get("clm") or (base_clm or {}).get(text)
        fused = models.get("fused")
        out[text] = {
            "fused": fused and fused["bits_per_byte"],
            "clm": clm and clm["bits_per_byte"],
            "difference": _difference(fused, clm),
        }
    return out


def table(store_root: Path, base_name: str, variants: list[str]) -> list[dict[str, Any]]:
    base = _json(store_root / base_name / Layout.METRICS)
    texts = ("heldout", *base.get("corpora", {}))
    base_clm = {t: _models(base, t).get("clm") for t in texts}
    rows = [row(store_root, base_name, "base: lambda 0.9, MinCE, sequence, per-byte, k 10", None, texts)]
    for v in variants:
        ref = base_clm
        if v in CLM_FROM:
            other = _json(store_root / f"{base_name}-{CLM_FROM[v]}" / Layout.METRICS)
            ref = {t: _models(other, t).get("clm") for t in texts}
        rows.append(row(store_root, f"{base_name}-{v}", v, ref, texts))
    return [r for r in rows if r]


def print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("nothing has run yet")
        return
    texts = [k for k in rows[0] if isinstance(rows[0][k], dict)]
    head = (
        "| variant | "
        + " | ".join(f"{t}: FuseLLM | {t}: CLM-only | {t}: FuseLLM - CLM [95% CI]" for t in texts)
        + " | MinCE picks |"
    )
    print("\n" + head + "\n|" + "---|" * (2 + 3 * len(texts)))
    for r in rows:
        cells = []
        for t in texts:
            c = r.get(t) or {}
            d = c.get("difference")
            cells += [
                _fmt(c.get("fused")),
                _fmt(c.get("clm")) + ("" if r["clm_is_own"] else " (base)"),
                f"{d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]" if d else "-",
            ]
        print(f"| {r['variant']} | " + " | ".join(cells) + f" | {r['picks']} |")
    print(
        "\n(base): no CLM-only run of its own; compared with the base run's (long-lambda-0p5: with "
        "the long one's)"
    )


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """FuseLLM minus CLM-only per variant and held-out text, with the 95% intervals (below 0: FuseLLM
    better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = [k for k in rows[0] if isinstance(rows[0][k], dict)]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    for j, text in enumerate(texts):
        ys, xs, lo, hi = [], [], [], []
        for i, r in enumerate(rows):
            d = (r.get(text) or {}).get("difference")
            if d:
                ys.append(i + (j - (len(texts) - 1) / 2) * 0.25)
                xs.append(d[0])
                lo.append(d[0] - d[1])
                hi.append(d[2] - d[0])
        ax.errorbar(xs, ys, xerr=[lo, hi], fmt="o", capsize=3, label=text)
    ax.axvline(0.0, color="grey", lw=1)
    ax.set_yticks(range(len(rows)), [r["variant"].split(":")[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("FuseLLM minus CLM-only, bits per byte (left of 0: FuseLLM better); 95% interval")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


SMOKE_VARIANTS = ["topk-3"]  # fusion changes, extraction and alignment adopted: the usual variant's path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.ablation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("variants", nargs="*", help=f"a selection of {list(VARIANTS)} (default: all)")
    ap.add_argument("--base", help=f"the base FusionRun, already run (default {BASE_SPEC.name})")
    ap.add_argument("--table", action="store_true", help="only print the table of what has run")
    ap.add_argument("--json", help="also write the table as JSON here")
    ap.add_argument("--plot", help="also plot the differences and their intervals (PNG) here")
    ap.add_argument(
        "--smoke", action="store_true", help=f"tiny base (bench.smoke), {SMOKE_VARIANTS}; checked"
    )
    args = ap.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if not args.smoke:
        return ablation(args, ap, args.base or str(BASE_SPEC), args.variants or list(VARIANTS))
    with tempfile.TemporaryDirectory(prefix="bench-ablation-smoke-") as tmp:
        from bench.smoke import write_tiny_base

        base = args.base or str(write_tiny_base(Path(tmp)))
        if subprocess.call([sys.executable, "-m", "jobs.cli", "run", base], cwd=ROOT) != 0:
            return 1
        return ablation(args, ap, base, args.variants or SMOKE_VARIANTS)


def ablation(args: argparse.Namespace, ap: argparse.ArgumentParser, base: str, variants: list[str]) -> int:
    base_doc = absolute_document(base)
    store_uri = base_doc["spec"]["store"]["uri"]
    if is_s3(store_uri):
        ap.error("the ablation links the base run's local outputs: use a file:// store")
    store_root = local_path(store_uri)
    base_name = base_doc["metadata"]["name"]
    if not (store_root / base_name / Layout.METRICS).is_file():
        ap.error(f"run the base first: {sys.executable} -m jobs.cli run {base}")
    failed = []
    if not args.table:
        out_dir = store_root / "ablation-specs"
        out_dir.mkdir(parents=True, exist_ok=True)
        for v in variants:
            t = time.time()
            rc = run_variant(base_doc, store_root, v, out_dir)
            print(f"=== {v}: exit {rc} after {time.time() - t:.0f} s", flush=True)
            if rc:
                failed.append(v)
    rows = table(store_root, base_name, variants)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    if args.plot and rows:
        plot(rows, Path(args.plot))
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    if args.smoke:
        failed += smoke_problems(rows, variants)
    return 1 if failed else 0


def smoke_problems(rows: list[dict[str, Any]], variants: list[str]) -> list[str]:
    """The table must have the base's row and each variant's, each with its difference on every text."""
    out = []
    labels = [r["variant"] for r in rows]
    if len(rows) != 1 + len(variants) or labels[1:] != variants:
        out.append(f"table rows {labels}, expected the base and {variants}")
    for r in rows:
        texts = [k for k in r if isinstance(r[k], dict)]
        out += [f"{r['variant']}: no difference on {t}" for t in texts if not r[t].get("difference")]
    for problem in out:
        print(f"FAILED: {problem}", file=sys.stderr)
    return out


if __name__ == "__main__":
    sys.exit(main())
