"""Benchmark: the operator on a real (local) API server.

    .venv/bin/python -m bench.operator [--runs 50] [--latency-samples 5] [--json OUT.json]

1. Latency: `kubectl apply -f` of one FusionRun -> its first Job exists (the prepare Job), several samples,
   one run at a time; the clock starts before kubectl (what a user waits for).
2. Burst: `--runs` FusionRuns in one `kubectl apply -f` (a multi-document file). Reconciled means: the
   run's status says Running and exactly its one prepare Job exists. Counted as errors: runs never
   reconciled within the timeout, runs with any Job other than `<run>-prepare-1` (duplicates), runs
   whose phase is Failed, and ERROR lines / tracebacks in the operator's log.

The control plane (etcd + kube-apiserver + kube-controller-manager v1.20.2 from
scripts/k8s-control-plane.sh) and the operator (`python -m fusionrun_operator.main`, a subprocess) are
started here and stopped at the end. No kubelet: the Jobs' pods stay Pending, so this measures the
operator alone. The runs' store is an empty local folder, which the operator reads on every pass.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kubernetes import client

from jobs.spec import API_GROUP, API_VERSION, PLURAL
from tests.harness.fusionrun_k8s import LABEL_RUN, OperatorProcess, fusionrun_yaml, tiny_spec
from tests.harness.k8s import ControlPlane, binaries_ready, start_control_plane, stop_control_plane


def bench_spec(store: Path) -> dict[str, Any]:
    spec = tiny_spec("unused")
    spec["corpus"] = {"uri": str(store.parent / "corpus.jsonl"), "format": "jsonl"}
    spec["store"] = {"uri": f"file://{store}"}
    return spec


def jobs_by_run(cp: ControlPlane, ns: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for j in client.BatchV1Api(cp.api()).list_namespaced_job(ns).items:
        run = (j.metadata.labels or {}).get(LABEL_RUN)
        if run:
            out.setdefault(run, []).append(j.metadata.name)
    return out


def phases(cp: ControlPlane, ns: str) -> dict[str, str | None]:
    items = client.CustomObjectsApi(cp.api()).list_namespaced_custom_object(
        API_GROUP, API_VERSION, ns, PLURAL
    )["items"]
    return {fr["metadata"]["name"]: (fr.get("status") or {}).get("phase") for fr in items}


def measure_latency(cp: ControlPlane, ns: str, spec: dict[str, Any], samples: int, tmp: Path) -> list[float]:
    out = []
    batch = client.BatchV1Api(cp.api())
    for i in range(samples):
        name = f"lat-{i}"
        path = tmp / f"{name}.yaml"
        path.write_text(fusionrun_yaml(name, spec))
        t0 = time.perf_counter()
        cp.kubectl("apply", "-f", str(path), namespace=ns)
        while not batch.list_namespaced_job(ns, label_selector=f"{LABEL_RUN}={name}").items:
            if time.perf_counter() - t0 > 60:
                raise SystemExit(f"no Job for {name} after 60 s: is the operator running? see its log")
            time.sleep(0.01)
        out.append(time.perf_counter() - t0)
    return out


def measure_burst(
    cp: ControlPlane, ns: str, spec: dict[str, Any], runs: int, tmp: Path, timeout: float
) -> dict[str, Any]:
    names = [f"burst-{i:03d}" for i in range(runs)]
    path = tmp / "burst.yaml"
    path.write_text("---\n".join(fusionrun_yaml(n, spec) for n in names))
    t0 = time.perf_counter()
    cp.kubectl("apply", "-f", str(path), namespace=ns, timeout=120)
    applied = time.perf_counter() - t0
    first_job: dict[str, float] = {}
    reconciled: dict[str, float] = {}
    while len(reconciled) < runs and time.perf_counter() - t0 < timeout:
        jobs, ph = jobs_by_run(cp, ns), phases(cp, ns)
        now = time.perf_counter() - t0
        for n in names:
            if n in jobs and n not in first_job:
                first_job[n] = now
            if n not in reconciled and ph.get(n) == "Running" and jobs.get(n) == [f"{n}-prepare-1"]:
                reconciled[n] = now
        time.sleep(0.1)
    time.sleep(3)  # a few more operator passes: nothing new may appear
    jobs, ph = jobs_by_run(cp, ns), phases(cp, ns)
    duplicates = sorted(n for n in names if sorted(jobs.get(n, [])) not in ([], [f"{n}-prepare-1"]))
    failed = sorted(n for n in names if ph.get(n) == "Failed")
    missing = sorted(n for n in names if n not in reconciled)
    return {
        "runs": runs,
        "apply_s": applied,
        "first_job_s": sorted(first_job.values()),
        "reconciled_s": sorted(reconciled.values()),
        "duplicates": duplicates,
        "failed": failed,
        "missing": missing,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.operator", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=50, help="FusionRuns applied at once (default 50)")
    ap.add_argument("--latency-samples", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=300, help="seconds for the burst to reconcile")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)

    ok, reason = binaries_ready()
    if not ok:
        print(reason, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-operator-") as d:
        tmp = Path(d)
        cp = start_control_plane(tmp / "k8s")
        operator = None
        try:
            cp.apply_crds()
            ns = cp.create_namespace("bench")
            store = tmp / "store"
            store.mkdir()
            (tmp / "corpus.jsonl").write_text('{"text": "unused"}\n')
            spec = bench_spec(store)
            operator = OperatorProcess(cp, ns, tmp / "operator.log").start()
            latency = measure_latency(cp, ns, spec, args.latency_samples, tmp)
            burst = measure_burst(cp, ns, spec, args.runs, tmp, args.timeout)
            log_errors = operator.errors()
            alive = operator.alive()
        finally:
            if operator:
                operator.stop()
            stop_control_plane(cp)
            if operator and operator.errors():
                first = "\n".join(operator.errors()[:20])
                print(f"operator log errors (first 20):\n{first}", file=sys.stderr)

    errors = len(burst["duplicates"]) + len(burst["failed"]) + len(burst["missing"]) + len(log_errors)
    rec = burst["reconciled_s"]
    rows = [
        ("apply -> first Job, median (s)", f"{statistics.median(latency):.2f}"),
        ("apply -> first Job, min / max (s)", f"{min(latency):.2f} / {max(latency):.2f}"),
        (f"burst: kubectl apply of {args.runs} runs (s)", f"{burst['apply_s']:.2f}"),
        ("burst: runs reconciled", f"{len(rec)} / {args.runs}"),
        (
            "burst: first / median / last reconciled (s)",
            f"{rec[0]:.2f} / {statistics.median(rec):.2f} / {rec[-1]:.2f}" if rec else "-",
        ),
        (
            "burst: last reconciled after kubectl returned (s)",
            f"{rec[-1] - burst['apply_s']:.2f}" if rec else "-",
        ),
        ("burst: runs with duplicate or extra Jobs", str(len(burst["duplicates"]))),
        ("burst: runs Failed", str(len(burst["failed"]))),
        ("operator log: ERROR lines / tracebacks", str(len(log_errors))),
        ("operator alive at the end", "yes" if alive else "NO"),
        ("errors (all of the above counted)", str(errors)),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  value")
    print(f"{'-' * width}  -----")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if args.json:
        args.json.write_text(
            json.dumps({"latency_s": latency, **burst, "log_errors": log_errors, "errors": errors}, indent=1)
        )
    return 1 if errors or not alive else 0


if __name__ == "__main__":
    raise SystemExit(main())
