"""Where can a source teach the target? fusion.diagnostics over a run's extract and align shards.

    .venv/bin/python -m bench.source_value --store /work/evidence-store --run pkg-code
    .venv/bin/python -m bench.source_value --store runs --run my-run --temperature 2 --top-k 5 --json d.json

The target is the model with extract shards but no align shards; every model under align/ is a source.
Fusion settings (temperature, top-k, CE unit) default to fusion.fuse's defaults; pass the run's own to see
what its fuse stage used. Prints one table per source, the overall figures and a one-line verdict.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fusion.diagnostics import Diagnostics, diagnose, merge
from fusion.format import read_shard


def run_models(run_dir: Path) -> tuple[str, list[str]]:
    """(target, sources) of a run from its store layout."""
    extracted = sorted(p.name for p in (run_dir / "extract").iterdir() if p.is_dir())
    aligned = sorted(p.name for p in (run_dir / "align").iterdir() if p.is_dir())
    targets = [m for m in extracted if m not in aligned]
    if len(targets) != 1 or not aligned:
        raise SystemExit(
            f"{run_dir}: expected one target (extract/ without align/) and aligned sources; found "
            f"extract {extracted}, align {aligned}: run the pipeline through align first"
        )
    return targets[0], aligned


def diagnose_run(
    run_dir: Path, temperature: float, top_k: int | None, floor: float, ce_unit: str
) -> Diagnostics:
    target, sources = run_models(run_dir)
    parts = []
    for path in sorted((run_dir / "extract" / target).glob("shard-*.safetensors")):
        aligned = {s: read_shard(run_dir / "align" / s / path.name, "aligned") for s in sources}
        own = {
            s: read_shard(run_dir / "extract" / s / path.name, "extract")
            for s in sources
            if (run_dir / "extract" / s / path.name).is_file()
        }
        parts.append(diagnose(read_shard(path, "extract"), aligned, own, temperature, top_k, floor, ce_unit))
    if not parts:
        raise SystemExit(f"{run_dir}/extract/{target}: no shards")
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, required=True, help="the local store folder (file:// URI's path)")
    ap.add_argument("--run", nargs="+", required=True, help="run name(s) in the store")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int)
    ap.add_argument(
        "--floor", type=float, default=1e-4, help="q(gold) charged for a gold outside the entries"
    )
    ap.add_argument("--ce-unit", choices=("byte", "token"), default="byte", help="MinCE's CE unit")
    ap.add_argument("--json", type=Path, help="also write the summaries here")
    args = ap.parse_args(argv)
    out = {}
    for name in args.run:
        d = diagnose_run(args.store / name, args.temperature, args.top_k, args.floor, args.ce_unit)
        print_report(d, name)
        out[name] = d.summary()
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
