"""Where can a source teach the target? fusion.diagnostics over a run's extract and align shards.

    .venv/bin/python -m bench.source_value --spec examples/evidence-pkg-code.yaml
    .venv/bin/python -m bench.source_value --store runs --run my-run --temperature 2 --top-k 5 --json d.json

The run's shards are found through its manifests (in its own folder, or the store's shared cache entries
they point at), its target and sources from its recorded spec. Fusion settings (temperature, top-k, CE
unit) default to the run's own. Prints one table per source, the overall figures and a one-line verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from fusion.diagnostics import Diagnostics, diagnose, merge
from fusion.format import read_shard


def shard_file(store: Any, task: Any, scratch: Path) -> Path:
    """A local file of a task's shard, wherever its manifest says the bytes are (jobs.cache.located)."""
    from jobs.cache import located
    from jobs.complete import read_manifest
    from jobs.registry import Layout

    manifest = read_manifest(store, task)
    if manifest is None:
        raise SystemExit(
            f"task {task.id} is not complete in {store.base_uri}: run the pipeline through align"
        )
    where, key = located(store, manifest, Layout.shard(task))
    return where.local_path(key) or where.download(key, scratch / key)


def diagnose_run(store: Any, spec: Any, settings: dict[str, Any], scratch: Path) -> Diagnostics:
    """The diagnostics of a run's every shard, merged (the target, each source's aligned and own shards)."""
    from jobs.registry import Stage, Task

    target, sources = spec.target.name, [m.name for m in spec.sources]
    parts = []
    for s in range(spec.extraction.shards):

        def shard(stage: Stage, model: str, kind: str, s: int = s) -> Any:
            return read_shard(shard_file(store, Task(stage, model, s), scratch), kind)

        aligned = {m: shard(Stage.align, m, "aligned") for m in sources}
        own = {m: shard(Stage.extract, m, "extract") for m in sources}
        parts.append(diagnose(shard(Stage.extract, target, "extract"), aligned, own, **settings))
    return merge(parts)


def print_report(d: Diagnostics, label: str) -> None:
    s = d.summary()
    print(f"\n## {label}: {s['positions']} target positions, {s['bytes']} bytes")
    print(
        f"target alone: {s['target_fused_view_bpb']:.4f} bits/byte as fusion uses it (k entries, "
        f"misses {s['target_miss_rate']:.1%}), {s['target_full_softmax_bpb']:.4f} full softmax; "
        f"top-k mass {s['target_topk_mass']:.3f}"
    )
    print(f"oracle over all candidates, per token: {s['oracle_all_candidates_bpb']:.4f} bits/byte")
    print(f"MinCE (all candidates, sequence level) picks per document: {s['mince_documents']}")
    for src in s["sources"]:
        fv, full, mass = src["fused_view_bpb"], src["full_softmax_bpb"], src["mass"]
        print(f"\n### source {src['source']}: on its aligned rows (coverage {src['coverage']:.1%})")
        print("| figure | target | source |\n|---|---|---|")
        print(f"| bits/byte as fusion uses it | {fv['target']:.4f} | {fv['source']:.4f} |")
        print(f"| bits/byte, full softmax | {full['target']:.4f} | {full['source']:.4f} |")
        bh = src["both_hit"]
        print(
            f"| bits/byte where both hold the gold ({bh['rows']:.1%} of rows) | {bh['target_bpb']:.4f} | "
            f"{bh['source_bpb']:.4f} |"
        )
        print(
            f"| gold outside the entries | {src['miss_rate']['target']:.1%} | "
            f"{src['miss_rate']['source']:.1%} |"
        )
        print(
            f"| rows with more mass on the gold (fused / full) | {src['rows_target_more_mass']:.1%} | "
            f"{src['rows_source_more_mass']:.1%} / {src['rows_source_more_full']:.1%} |"
        )
        print(
            f"\noracle per token {fv['token_oracle']:.4f}, per document {fv['document_oracle']:.4f}, "
            f"MinCE (this source vs the target) {fv['mince']:.4f}, token-level MinCE (fusion.fuse's rule, "
            f"picks the source on {src['token_mince']['rows_source']:.1%} of rows) "
            f"{src['token_mince']['bpb']:.4f} bits/byte"
        )
        print(
            f"documents: source better on {src['documents_source_better']} of {src['documents']} "
            f"({src['bytes_source_better']:.1%} of bytes); "
            f"MinCE picks it on {src['documents_mince_source']}, "
            f"agreeing with the per-document oracle on {src['mince_agreement']:.1%}"
        )
        own = "-" if mass["source_topk_own"] is None else f"{mass['source_topk_own']:.3f}"
        print(
            f"mass: coverage {src['coverage']:.1%} of positions; top-k mass at its own positions {own}; "
            f"full-softmax mass kept after projection at aligned rows {mass['kept_after_projection']:.3f}; "
            f"entries kept {mass['entries_kept']:.1%}"
        )
    print(f"\nverdict: {s['verdict']}")


def runs(args: argparse.Namespace) -> list[tuple[str, Any, Any]]:
    """(name, store, spec) of each run asked for: --spec FILE, or --store URI --run NAME..."""
    from jobs.observe import recorded_spec
    from jobs.settings import Settings
    from jobs.spec import StoreSpec, load_fusionrun
    from jobs.store import open_store

    settings = Settings.from_env(os.environ)  # this command's entry point
    if args.spec:
        run = load_fusionrun(args.spec)
        return [(run.metadata.name, open_store(run.spec.store, run.metadata.name, settings), run.spec)]
    if not args.store or not args.run:
        raise SystemExit("give --spec FILE, or --store URI and --run NAME")
    uri = args.store if "://" in args.store else Path(args.store).resolve().as_uri()  # a folder: file://
    out = []
    for name in args.run:
        store = open_store(StoreSpec(uri=uri), name, settings)
        spec = recorded_spec(store)
        if spec is None:
            raise SystemExit(f"no run {name!r} in {args.store} (no recorded spec)")
        out.append((name, store, spec))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", type=Path, help="a FusionRun file (its store and name)")
    ap.add_argument("--store", help="a store URI or folder, with --run (the runs' recorded specs are read)")
    ap.add_argument("--run", nargs="+", default=[], help="run name(s) in --store")
    ap.add_argument("--temperature", type=float, help="default: the run's fusion.temperature")
    ap.add_argument("--top-k", type=int, help="default: the run's fusion.topK")
    ap.add_argument(
        "--floor", type=float, default=1e-4, help="q(gold) charged for a gold outside the entries"
    )
    ap.add_argument("--ce-unit", choices=("byte", "token"), help="MinCE's CE unit (default: the run's)")
    ap.add_argument("--json", type=Path, help="also write the summaries here")
    args = ap.parse_args(argv)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, store, spec in runs(args):
            fz = spec.fusion
            settings = {
                "temperature": args.temperature or fz.temperature,
                "top_k": args.top_k or fz.top_k,
                "floor": args.floor,
                "ce_unit": args.ce_unit or fz.ce_unit,
            }
            d = diagnose_run(store, spec, settings, Path(tmp))
            print_report(d, name)
            out[name] = d.summary()
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
