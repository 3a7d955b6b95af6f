"""Run every benchmark, one after another, each printing its own side-by-side table of ratios.

    make bench                      # all of them
    .venv/bin/python -m bench.run storage align   # a selection

Each benchmark is a module with its own arguments (see its docstring); this runner uses their defaults and
runs each in its own process, so one benchmark's memory and threads never skew the next.
"""

from __future__ import annotations

import subprocess
import sys
import time

BENCHMARKS = {
    "storage": "bytes stored per real token vs the reference's padded int64 layout (goal <= 1/5)",
    "align": "vocabulary map + DTW alignment vs pure Python, identical outputs (goal >= 100x)",
    "extract": "extraction tokens/s vs a bare forward pass (goal overhead <= 10%)",
    "train_step": "fused-loss training step vs CLM-only step, peak memory (goal <= 1.15x)",
    "operator": "kubectl apply -> first Job latency; 50 FusionRuns at once (needs the k8s control plane)",
}
# Heavy ones, run by name (real pretrained models: scripts/fetch-real-models.sh, tens of minutes on CPU):
#   cache_reuse   a second run with another lambda, with and without the shared cache (jobs.cache)
#   ablation      the fusion ablation table (docs/results.md)


def main(argv: list[str]) -> int:
    names = argv or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}", file=sys.stderr)
        return 2
    failed = []
    for name in names:
        print(f"\n=== bench.{name}: {BENCHMARKS[name]}", flush=True)
        t = time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", f"bench.{name}"])
        print(f"=== bench.{name}: exit {rc} after {time.perf_counter() - t:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"\nfailed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
