"""Extract once, fuse many, measured: a second run with another lambda, with and without reuse, side by side.

    bash scripts/fetch-real-models.sh
    .venv/bin/python -m bench.cache_reuse                          # examples/real-smollm2-gemma.yaml
    .venv/bin/python -m bench.cache_reuse --base FILE --until fuse --lambda 0.8

The base run is made first (or found complete: its prepare, extract and align entries are in the store's
shared cache, jobs.cache). Then the same FusionRun with another training.lambda runs twice under other
names, in one invocation: once as users get it (its prepare/extract/align adopt the base run's entries) and
once with FUSIONRUN_REUSE=off (every stage of its own, as before the cache existed). Both stop after
`--until` (default fuse: training and evaluation are the same work either way, and lambda changes only
training). The two variant runs are deleted afterwards (jobs.cache.release_run), so the next invocation
measures again.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.ablation import absolute_document
from jobs.cache import release_run
from jobs.registry import Stage
from jobs.spec import parse_fusionrun
from jobs.store import open_store

ROOT = Path(__file__).resolve().parent.parent
BASE_SPEC = ROOT / "examples" / "real-smollm2-gemma.yaml"


def variant(base_doc: dict[str, Any], suffix: str, lam: float) -> dict[str, Any]:
    doc = yaml.safe_load(yaml.safe_dump(base_doc))
    doc["metadata"]["name"] = f"{base_doc['metadata']['name']}-{suffix}"
    doc["spec"].setdefault("training", {})["lambda"] = lam
    doc["spec"].setdefault("evaluation", {})["evaluateSources"] = False
    return doc


def run(doc: dict[str, Any], until: str, env: dict[str, str], folder: Path) -> tuple[float, dict[str, int]]:
    """Seconds of one `fusionrun run` and how many tasks ran / were skipped / reused."""
    path = folder / f"{doc['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(doc))
    cmd = [sys.executable, "-m", "jobs.cli", "run", str(path), "--until", until]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return seconds, outcome_counts(out.stdout)


def outcome_counts(stdout: str) -> dict[str, int]:
    """Task lines of `fusionrun run` ("  <task id>  <outcome> ...") counted by outcome."""
    counts = {"ran": 0, "skipped": 0, "reused": 0}
    for line in stdout.splitlines():
        parts = line.split()
        if line.startswith("  ") and len(parts) >= 2 and parts[1] in counts:
            counts[parts[1]] += 1
    return counts


def release(doc: dict[str, Any]) -> None:
    """Delete a variant run: its user records in the shared cache, then its own artifacts."""
    spec = parse_fusionrun(doc).spec
    store = open_store(spec.store, doc["metadata"]["name"])
    release_run(store, doc["metadata"]["name"])
    store.delete_prefix("")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cache_reuse", description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, default=BASE_SPEC, help="the base FusionRun (run first if needed)")
    ap.add_argument("--until", default=Stage.fuse.value, help="stop each run after this stage (default fuse)")
    ap.add_argument("--lambda", dest="lam", type=float, default=0.8, help="the second run's training.lambda")
    args = ap.parse_args(argv)
    base_doc = absolute_document(args.base)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base_s, base_n = run(base_doc, args.until, env, folder)
        print(f"base run {base_doc['metadata']['name']}: {base_s:.1f} s ({base_n})", flush=True)
        reuse = variant(base_doc, "reuse-bench", args.lam)
        fresh = variant(base_doc, "noreuse-bench", args.lam)
        try:
            with_s, with_n = run(reuse, args.until, env, folder)
            without_s, without_n = run(fresh, args.until, {**env, "FUSIONRUN_REUSE": "off"}, folder)
        finally:
            for doc in (reuse, fresh):
                release(doc)
    print(f"\nsecond run, training.lambda {args.lam}, until {args.until}:")
    print(f"| {'':<22} | {'seconds':>8} | tasks ran | reused |")
    for label, secs, n in (
        ("with reuse (default)", with_s, with_n),
        ("FUSIONRUN_REUSE=off", without_s, without_n),
    ):
        print(f"| {label:<22} | {secs:8.1f} | {n['ran']:>9} | {n['reused']:>6} |")
    print(f"ratio without / with reuse: {without_s / with_s:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
