"""Run every benchmark, one after another, each printing its own side-by-side table of ratios.

    make bench                                          # all of them (bench.run)
    .venv/bin/python -m bench.run storage align         # a selection
    make bench-smoke                                    # every one at tiny sizes, checked (bench.run --smoke)

Each benchmark is a module with its own arguments (see its docstring); this runner uses their defaults and
runs each in its own process, so one benchmark's memory and threads never skew the next. It fails when a
benchmark fails: a crash, or one of the benchmark's own checks (outputs identical to the reference's, shared
outputs made once, the Jobs expected; never a timing).

`--smoke` runs each at tiny sizes in a few minutes (CI runs it: tests/test_bench_smoke.py), so that no
benchmark rots unseen: the ones `make bench` runs, and the heavy real-model ones on tiny random-init models
(bench.smoke: one base run that cache_reuse, evidence and ablation share). Its figures mean nothing.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.timing import machine_load

BENCHMARKS = {
    "storage": "bytes stored per real token vs the reference's padded int64 layout (goal <= 1/5)",
    "align": "vocabulary map + DTW alignment vs pure Python, identical outputs (goal >= 100x)",
    "extract": "extraction tokens/s vs a bare forward pass (goal overhead <= 10%)",
    "train_step": "fused-loss training step vs CLM-only step, peak memory (goal <= 1.15x)",
    "operator": "differing and identical FusionRuns: apply -> first Job / waiting; 50 at once; at scale",
}
# Heavy ones, run by name (real pretrained models: scripts/fetch-real-models.sh, hours on CPU); each has a
# smoke path on the tiny models (bench.smoke).
HEAVY = {
    "cache_reuse": "a second run with another lambda, with and without the shared cache (jobs.cache)",
    "evidence": "FuseLLM vs its baselines, and the runs that change one thing (docs/results.md)",
    "ablation": "the earlier fusion ablation table (docs/results.md)",
    "task_scoring": "a multiple-choice task through HFLM vs the shared-context scoring evaluate uses",
}
# The heavy ones whose smoke shares the tiny base run (bench.smoke); the others make their own tiny inputs.
SHARED_BASE = ("cache_reuse", "evidence", "ablation")
# name -> the arguments of its smoke run. The heavy ones get `--base <the shared tiny base>` too.
SMOKE = {
    "storage": ["--max-bytes", "8000"],
    "align": [
        *("--docs", "3", "--plain-map-queries", "2", "--plain-dtw-docs", "1"),
        *("--rounds", "2", "--no-full-map"),
    ],
    "extract": ["--model", "tiny", "--docs", "4", "--rounds", "2"],
    "train_step": ["--vocab", "2000", "--batch", "1", "--seq", "32", "--steps", "3"],
    "operator": [
        *("--runs", "3", "--latency-samples", "2", "--timeout", "120"),
        *("--scale-shards", "4", "--scale-models", "2", "--scale-window", "3"),
    ],
    "cache_reuse": ["--smoke"],
    "evidence": ["--smoke"],
    "ablation": ["--smoke"],
    "task_scoring": ["--smoke"],
}
SMOKE_TIMEOUT = 900  # seconds per benchmark: a hang fails the smoke instead of holding CI


def call(argv: list[str], timeout: float | None) -> int:
    """Run one benchmark; past `timeout`, SIGTERM (it stops what it started), then SIGKILL."""
    proc = subprocess.Popen(argv)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        print(f"=== timed out after {timeout:.0f} s: stopping it", file=sys.stderr, flush=True)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return 124


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", help=f"a selection of {[*BENCHMARKS, *HEAVY]}")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, heavy ones included by default")
    ap.add_argument("--timeout", type=float, help=f"seconds per benchmark (--smoke: {SMOKE_TIMEOUT})")
    args = ap.parse_args(argv)
    known = {**BENCHMARKS, **HEAVY}
    names = args.names or list(SMOKE if args.smoke else BENCHMARKS)
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {list(known)}", file=sys.stderr)
        return 2
    timeout = args.timeout or (SMOKE_TIMEOUT if args.smoke else None)
    failed, seconds = [], {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-smoke-") as tmp:
        base: list[str] = []
        if args.smoke and any(n in SHARED_BASE for n in names):
            from bench.smoke import write_tiny_base

            base = ["--base", str(write_tiny_base(Path(tmp)))]
        for name in names:
            extra = [*SMOKE[name], *(base if name in SHARED_BASE else [])] if args.smoke else []
            print(f"\n=== bench.{name}{' (smoke)' if args.smoke else ''}: {known[name]}", flush=True)
            t = time.perf_counter()
            rc = call([sys.executable, "-m", f"bench.{name}", *extra], timeout)
            seconds[name] = time.perf_counter() - t
            print(f"=== bench.{name}: exit {rc} after {seconds[name]:.0f} s", flush=True)
            if rc:
                failed.append(name)
    total = time.perf_counter() - started
    each = ", ".join(f"{n} {s:.0f} s" for n, s in seconds.items())
    print(
        f"\n{'smoke' if args.smoke else 'benchmarks'}: {len(names) - len(failed)} of {len(names)} passed in "
        f"{total:.0f} s ({each}; {machine_load()})"
    )
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
