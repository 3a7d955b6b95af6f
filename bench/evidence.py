"""Does FuseLLM transfer knowledge from ANOTHER model? The comparison that can tell (docs/evidence-notes.md).

    .venv/bin/python examples/data/make_pkg_code_corpus.py     # the corpus (examples/data/generated/)
    .venv/bin/python examples/data/make_debian_faq_text.py     # prose held-out text (needs debian-faq)
    .venv/bin/python -m jobs.cli run examples/real-pkg-code.yaml           # base: FuseLLM + CLM-only
    .venv/bin/python -m bench.evidence source-only self                   # the variants below
    .venv/bin/python -m bench.evidence --table                            # the comparison table

Every variant is a real `fusionrun run` of the base FusionRun with a few fields changed, under the name
`<base>-<variant>` in the same store, on the same data, steps, seed and schedule; it starts from hard
links to the base run's prepare/extract/align outputs (bench.ablation's mechanism) and trains the FuseLLM
model only. Variants:
  source-only  the source alone as the teacher (fusion.includeTarget false)
  self         self-distillation: the target as its own only teacher. For now a second copy of the target
               named `self` is the only source (includeTarget false). The model list is part of prepare's
               fingerprint, so its prepare is redone (and must come out byte-identical to the base run's);
               both its extractions are the base run's target shards, linked, with manifests written for
               its own spec by jobs.manifest. Alignment of a model onto itself is then 1:1 everywhere.
  others       fusion or training settings (lambda, level, strategy, k), FuseLLM only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.ablation import _json, deep_merge, link_reused

ROOT = Path(__file__).resolve().parent.parent
BASE_SPEC = ROOT / "examples" / "real-pkg-code.yaml"
SELF = "self"

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "source-only": ("the source alone as the teacher", {"fusion": {"includeTarget": False}}),
    SELF: ("self-distillation: the target as its own only teacher", {"fusion": {"includeTarget": False}}),
    "lambda-0p9": ("lambda 0.9 (the paper's)", {"training": {"lambda": 0.9}}),
    "lambda-0p5": ("lambda 0.5", {"training": {"lambda": 0.5}}),
    "token-level": ("MinCE per position", {"fusion": {"level": "token"}}),
    "avgce": ("AvgCE", {"fusion": {"strategy": "avgCE"}}),
    "seed-1": ("seed 1, with its own CLM-only baseline", {"training": {"seed": 1, "clmBaseline": True}}),
    "fused-seed-1": ("FuseLLM with seed 1 (data order)", {"training": {"seed": 1}}),
    "self-seed-1": (
        "self-distillation, seed 1",
        {"fusion": {"includeTarget": False}, "training": {"seed": 1}},
    ),
    "source-only-seed-1": (
        "the source alone, seed 1",
        {"fusion": {"includeTarget": False}, "training": {"seed": 1}},
    ),
}


def is_self(variant: str) -> bool:
    return variant == SELF or variant.startswith(SELF + "-")


def variant_document(base_doc: dict[str, Any], variant: str) -> dict[str, Any]:
    _, over = VARIANTS[variant]
    common = {"training": {"clmBaseline": False}, "evaluation": {"evaluateSources": False}}
    spec = deep_merge(deep_merge(base_doc["spec"], common), over)
    if is_self(variant):
        target = spec["target"]
        spec["sources"] = [{**target, "name": SELF}]
    return {
        "apiVersion": base_doc["apiVersion"],
        "kind": "FusionRun",
        "metadata": {"name": f"{base_doc['metadata']['name']}-{variant}"},
        "spec": spec,
    }


def link_self_extraction(base_dir: Path, spec_path: Path) -> None:
    """For a self variant: its prepare must equal the base run's; then the base run's target shards serve
    as both its extractions, with manifests for its own spec (fingerprints and input digests)."""
    from jobs.manifest import Output, build_manifest, input_digests, manifest_key, write_manifest
    from jobs.plan import Stage, build_dag
    from jobs.spec import load_fusionrun
    from jobs.store import open_store

    rc = subprocess.call(
        [sys.executable, "-m", "jobs.cli", "run", str(spec_path), "--until", "prepare"], cwd=ROOT
    )
    if rc:
        raise SystemExit(f"prepare of {spec_path} failed")
    run = load_fusionrun(spec_path)
    store = open_store(run.spec.store, run.metadata.name)
    ours = _json(Path(store.root) / "prepare" / "manifest.json")["outputs"]
    theirs = _json(base_dir / "prepare" / "manifest.json")["outputs"]
    if ours != theirs:
        raise SystemExit("the self variant's prepared shards differ from the base run's: cannot reuse them")
    dag = build_dag(run.spec)
    by_id = {t.id: t for t in dag}
    target = run.spec.target.name
    for task in (t for t in dag if t.stage is Stage.extract):
        key = manifest_key(task)
        if (Path(store.root) / key).is_file():
            continue
        base_key = f"extract/{target}/shard-{task.shard:05d}"
        base_manifest = _json(base_dir / f"{base_key}.manifest.json")
        out_key = f"extract/{task.model}/shard-{task.shard:05d}.safetensors"
        dst = Path(store.root) / out_key
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            os.link(base_dir / f"{base_key}.safetensors", dst)
        o = base_manifest["outputs"][f"{base_key}.safetensors"]
        manifest = build_manifest(
            run.spec,
            task,
            {out_key: Output(o["sha256"], o["bytes"])},
            input_digests(store, by_id, task),
            time.time(),
            base_manifest.get("counts"),
            {**base_manifest.get("summary", {}), "linked_from": str(base_dir / base_key)},
        )
        write_manifest(store, task, manifest)


def run_variant(base_doc: dict[str, Any], store_root: Path, variant: str, until: str | None = None) -> int:
    from jobs.spec import parse_fusionrun

    doc = variant_document(base_doc, variant)
    parse_fusionrun(doc)  # a bad override fails here, naming the field
    name = doc["metadata"]["name"]
    base_dir = store_root / base_doc["metadata"]["name"]
    out_dir = store_root / "evidence-specs"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    print(f"\n=== {variant}: {VARIANTS[variant][0]}\n    {sys.executable} -m jobs.cli run {path}", flush=True)
    if is_self(variant):
        (store_root / name).mkdir(parents=True, exist_ok=True)
        link_self_extraction(base_dir, path)
    else:
        link_reused(base_dir, store_root / name)
    rc = subprocess.call(
        [sys.executable, "-m", "jobs.cli", "run", str(path), *(["--until", until] if until else [])], cwd=ROOT
    )
    if rc == 0 and until is None:
        for ckpt in (store_root / name / "train").glob("*/checkpoints"):
            import shutil

            shutil.rmtree(ckpt, ignore_errors=True)
    return rc


# ------------------------------------------------------------------------------------------------
# The table


def models_of(metrics: dict[str, Any], text: str) -> dict[str, Any]:
    if text == "heldout":
        return metrics.get("models", {})
    return metrics.get("corpora", {}).get(text, {}).get("models", {})


def collect(store_root: Path, base: str, variants: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """text -> model label -> its scores (bits_per_byte, perplexity, doc_bits, doc_bytes)."""
    base_m = _json(store_root / base / "evaluate" / "metrics.json")
    texts = ["heldout", *base_m.get("corpora", {})]
    out: dict[str, dict[str, dict[str, Any]]] = {t: {} for t in texts}
    for t in texts:
        for label, m in models_of(base_m, t).items():
            out[t]["FuseLLM" if label == "fused" else "CLM-only" if label == "clm" else label] = m
        for v in variants:
            vm = _json(store_root / f"{base}-{v}" / "evaluate" / "metrics.json")
            for label, m in models_of(vm, t).items():
                if label == "fused":
                    out[t][v] = m
                elif label == "clm":
                    out[t][f"CLM-only ({v})"] = m
    return out


def difference(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    from fusion.evaluate import paired_bpb_difference

    if not a or not b:
        return "-"
    d = paired_bpb_difference(np.array(a["doc_bits"]), np.array(b["doc_bits"]), np.array(a["doc_bytes"]))
    return f"{d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]"


COMPARISONS = (
    ("FuseLLM", "CLM-only"),
    ("FuseLLM", SELF),
    ("source-only", SELF),
    ("source-only", "CLM-only"),
    (SELF, "CLM-only"),
)


def print_table(scores: dict[str, dict[str, dict[str, Any]]], extra: list[tuple[str, str]]) -> None:
    for text, models in scores.items():
        print(f"\n### {text}\n\n| model | bits/byte | perplexity |\n|---|---|---|")
        for label, m in models.items():
            ppl = "-" if label.startswith("source:") else f"{m['perplexity']:.3f}"
            print(f"| {label} | {m['bits_per_byte']:.4f} | {ppl} |")
        print("\n| comparison | bits/byte difference [95% paired bootstrap CI] |\n|---|---|")
        for a, b in (*COMPARISONS, *extra):
            if a in models and b in models:
                print(f"| {a} minus {b} | {difference(models[a], models[b])} |")


def main(argv: list[str] | None = None) -> int:
    from jobs.spec import load_fusionrun

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="*", help=f"a selection of {list(VARIANTS)}")
    ap.add_argument("--base", default=str(BASE_SPEC))
    ap.add_argument("--table", action="store_true", help="only print the table of what has run")
    ap.add_argument("--until", help="stop each variant after this stage (e.g. fuse, while another trains)")
    ap.add_argument("--compare", nargs="*", default=[], help="more comparisons, as A:B labels")
    ap.add_argument("--json", type=Path, help="also write the collected scores (without per-document bits)")
    args = ap.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    run = load_fusionrun(args.base)
    base_doc = {
        "apiVersion": run.api_version,
        "metadata": {"name": run.metadata.name},
        "spec": run.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
    }
    store_root = Path(run.spec.store.uri.removeprefix("file://"))
    base = run.metadata.name
    if not args.until and not (store_root / base / "evaluate" / "metrics.json").is_file():
        ap.error(f"run the base first: {sys.executable} -m jobs.cli run {args.base}")
    failed = []
    if not args.table:
        for v in args.variants:
            t = time.time()
            rc = run_variant(base_doc, store_root, v, args.until)
            print(f"=== {v}: exit {rc} after {time.time() - t:.0f} s", flush=True)
            failed += [v] if rc else []
    done = [v for v in VARIANTS if (store_root / f"{base}-{v}" / "evaluate" / "metrics.json").is_file()]
    scores = collect(store_root, base, done)
    print_table(scores, [tuple(c.split(":", 1)) for c in args.compare])  # type: ignore[misc]
    if args.json:
        slim = {
            t: {k: {f: v for f, v in m.items() if not f.startswith("doc_")} for k, m in ms.items()}
            for t, ms in scores.items()
        }
        args.json.write_text(json.dumps(slim, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
