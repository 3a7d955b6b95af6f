"""Extract once, fuse many, measured: a second run with another lambda, with and without reuse, side by side.

    bash scripts/fetch-real-models.sh
    .venv/bin/python -m bench.cache_reuse                          # examples/real-smollm2-gemma.yaml
    .venv/bin/python -m bench.cache_reuse --base FILE --until fuse --lambda 0.8 [--rounds 3]
    .venv/bin/python -m bench.cache_reuse --smoke            # the tiny base (bench.smoke), until align

The base run is made first (or found complete: its prepare, extract and align entries are in the store's
shared cache, jobs.cache). Then the same FusionRun with another training.lambda runs twice under other
names, in one invocation: once as users get it (its prepare/extract/align adopt the base run's entries) and
once with FUSIONRUN_REUSE=off (every stage of its own, as before the cache existed). Both stop after
`--until` (default fuse: training and evaluation are the same work either way, and lambda changes only
training). The two variant runs are deleted after each (jobs.cache.release_run), so that the next round
or invocation measures again. With `--rounds N` the two are interleaved round by round (bench.timing) and the
ratio is the median of the per-round ratios, with its spread. Checked (exit 1 otherwise), whatever the
timings: with reuse, every prepare, extract and align task of the second run is reused, not run; without,
each runs.
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
from bench.timing import interleave, machine_load
from jobs.cache import release_run
from jobs.settings import Settings
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


def run(doc: dict[str, Any], until: str, env: dict[str, str], folder: Path) -> dict[str, str]:
    """One `fusionrun run`: each task's outcome (ran / skipped / reused)."""
    path = folder / f"{doc['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(doc))
    cmd = [sys.executable, "-m", "jobs.cli", "run", str(path), "--until", until]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return outcomes(out.stdout)


def outcomes(stdout: str) -> dict[str, str]:
    """Task lines of `fusionrun run` ("  <task id>  <outcome> ...") as {task id: outcome}."""
    out = {}
    for line in stdout.splitlines():
        parts = line.split()
        if line.startswith("  ") and len(parts) >= 2 and parts[1] in ("ran", "skipped", "reused"):
            out[parts[0]] = parts[1]
    return out


def counts(tasks: dict[str, str]) -> dict[str, int]:
    return {k: sum(1 for v in tasks.values() if v == k) for k in ("ran", "skipped", "reused")}


CACHEABLE = ("prepare", "extract", "align")  # the stages whose outputs are shared across runs (jobs.cache)


def problems(with_reuse: dict[str, str], without: dict[str, str]) -> list[str]:
    """What the cache must do, whatever the timings: the second run makes no cacheable output again."""
    out = []
    for tasks, want, label in ((with_reuse, "reused", "with reuse"), (without, "ran", "FUSIONRUN_REUSE=off")):
        cached = {t: o for t, o in tasks.items() if t.split("-")[0] in CACHEABLE}
        if not cached:
            out.append(f"{label}: no prepare / extract / align task in its output")
        out += [f"{label}: {t} {o}, not {want}" for t, o in sorted(cached.items()) if o != want]
    return out


def release(doc: dict[str, Any]) -> None:
    """Delete a variant run: its user records in the shared cache, then its own artifacts."""
    spec = parse_fusionrun(doc).spec
    store = open_store(spec.store, doc["metadata"]["name"], Settings.from_env(os.environ))
    release_run(store, doc["metadata"]["name"])
    store.delete_prefix("")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cache_reuse", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--base", type=Path, help="the base FusionRun (run first if needed; default: the real one)"
    )
    ap.add_argument("--until", help="stop each run after this stage (default fuse; align with --smoke)")
    ap.add_argument("--lambda", dest="lam", type=float, default=0.8, help="the second run's training.lambda")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds of the two second runs")
    ap.add_argument("--smoke", action="store_true", help="the tiny base (bench.smoke) unless --base")
    args = ap.parse_args(argv)
    until = args.until or ("align" if args.smoke else "fuse")
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.base is None and args.smoke:
            from bench.smoke import write_tiny_base

            args.base = write_tiny_base(folder / "smoke")
        base_doc = absolute_document(args.base or BASE_SPEC)
        t0 = time.perf_counter()
        base = run(base_doc, until, env, folder)
        print(f"base run {base_doc['metadata']['name']}: {time.perf_counter() - t0:.1f} s {counts(base)}")
        reuse = variant(base_doc, "reuse-bench", args.lam)
        fresh = variant(base_doc, "noreuse-bench", args.lam)
        seen: dict[str, dict[str, str]] = {}
        variants = {
            "with": lambda: run(reuse, until, env, folder),
            "without": lambda: run(fresh, until, {**env, "FUSIONRUN_REUSE": "off"}, folder),
        }

        def done(name: str, tasks: dict[str, str]) -> None:  # off the clock: delete it, measure it again
            seen[name] = tasks
            release(reuse if name == "with" else fresh)

        try:
            t = interleave(variants, rounds=args.rounds, warmup=0, after=done)
        finally:
            for doc in (reuse, fresh):
                release(doc)
    print(f"\nsecond run, training.lambda {args.lam}, until {until}; {machine_load()}:")
    print(f"| {'':<22} | {'seconds (median)':>16} | tasks ran | reused |")
    for label, name in (("with reuse (default)", "with"), ("FUSIONRUN_REUSE=off", "without")):
        n = counts(seen[name])
        print(f"| {label:<22} | {t.median(name):16.1f} | {n['ran']:>9} | {n['reused']:>6} |")
    print(f"ratio without / with reuse: {t.ratio('without', 'with').fmt('x', 1)}")
    wrong = problems(seen["with"], seen["without"])
    for w in wrong:
        print(f"FAILED: {w}", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
