"""The `fusionrun` command.

fusionrun run FILE.yaml [--force-stage S] [--workers N]   the whole run on this machine (jobs.local)
fusionrun validate FILE.yaml                              check a FusionRun; errors name the field
fusionrun stage <stage> [--model M] [--shard N] ...       one task (= python -m jobs ...)
fusionrun crd [...]                                       the CRD generated from the spec (jobs.crd)
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from typing import TYPE_CHECKING

from jobs.plan import STAGE_ORDER

if TYPE_CHECKING:
    from jobs.spec import FusionRunSpec

STAGES = [s.value for s in STAGE_ORDER]


def stage_parser(prog: str = "python -m jobs") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Run one FusionRun task (as a Kubernetes Job)")
    ap.add_argument("stage", choices=STAGES)
    ap.add_argument("--model", help="extract: any model; align: a source model")
    ap.add_argument("--shard", type=int, help="shard number (extract, align, fuse)")
    ap.add_argument("--variant", choices=["fused", "clm"], help="train: fused (FuseLLM) or clm (baseline)")
    ap.add_argument("--spec", help="FusionRun YAML/JSON file (default: env FUSIONRUN_SPEC, JSON of the spec)")
    ap.add_argument("--run", help="run name (default: env FUSIONRUN_NAME or the file's metadata.name)")
    ap.add_argument("--force", action="store_true", help="rerun even when the task is complete")
    return ap


def _check_task_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    need_model = args.stage in ("extract", "align")
    need_shard = args.stage in ("extract", "align", "fuse")
    if need_model and not args.model:
        ap.error(f"{args.stage} needs --model NAME")
    if need_shard and args.shard is None:
        ap.error(f"{args.stage} needs --shard N")
    if not need_model and args.model:
        ap.error(f"{args.stage} takes no --model")
    if not need_shard and args.shard is not None:
        ap.error(f"{args.stage} takes no --shard")
    if args.variant and args.stage != "train":
        ap.error("--variant is for train only")


def stage_main(argv: list[str] | None = None) -> int:
    """Entry of `python -m jobs`: run one task; exit 0 done/skipped, 1 failed (message on stderr), 2 usage."""
    from jobs.manifest import ManifestError
    from jobs.spec import SpecError
    from jobs.stages.common import EXIT_FAILED, StageError, load_spec_and_name, log_event, run_task
    from jobs.store import StoreError

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = stage_parser()
    args = ap.parse_args(argv)
    _check_task_args(ap, args)
    if args.stage == "train":
        # Training owns its own process layout (DeepSpeed ranks, checkpoints, manifest).
        train = importlib.import_module("jobs.stages.train")
        return int(train.main(argv[1:]) or 0)
    try:
        spec, name = load_spec_and_name(args.spec, args.run)
        from jobs.plan import Stage, Task

        if args.model and args.model not in {m.name for m in spec.models}:
            raise StageError(
                f"--model {args.model}: no such model in the spec; known: {[m.name for m in spec.models]}"
            )
        if args.stage == "align" and args.model == spec.target.name:
            raise StageError(f"--model {args.model} is the target; align takes a source model")
        if args.shard is not None and not 0 <= args.shard < spec.extraction.shards:
            raise StageError(f"--shard {args.shard}: the run has extraction.shards={spec.extraction.shards}")
        task = Task(Stage(args.stage), model=args.model, shard=args.shard, variant=args.variant)
        module = importlib.import_module(f"jobs.stages.{args.stage}")
        return run_task(module.run, task, spec, name, force=args.force)
    except (SpecError, StageError, StoreError, ManifestError) as err:
        log_event("failed", stage=args.stage, error=str(err))
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED


def cmd_validate(path: str) -> int:
    from jobs.plan import build_dag
    from jobs.spec import SpecError, load_fusionrun

    try:
        run = load_fusionrun(path)
    except SpecError as err:
        print(f"{path}: {err}", file=sys.stderr)
        return 1
    errors = benchmark_errors(run.spec)
    if errors:
        print(f"{path}: invalid FusionRun:\n  " + "\n  ".join(errors), file=sys.stderr)
        return 1
    dag = build_dag(run.spec)
    print(
        f"{path}: valid FusionRun {run.metadata.name!r}: {len(run.spec.models)} models, "
        f"{run.spec.extraction.shards} shard(s), {len(dag)} tasks"
    )
    return 0


def benchmark_errors(spec: FusionRunSpec) -> list[str]:
    """evaluation.tasks / taskDirs problems found before anything runs (jobs.benchmarks.light_errors)."""
    if not spec.evaluation.enabled or not spec.evaluation.tasks:
        return []
    from jobs.benchmarks import light_errors

    return light_errors(spec)


def cmd_run(path: str, force_stage: str | None, workers: int | None, until: str | None = None) -> int:
    from jobs.local import LocalRunner, RunFailed, RunStopped
    from jobs.spec import SpecError, load_fusionrun
    from jobs.store import StoreError

    try:
        run = load_fusionrun(path)
        spec = apply_env_overrides(run.spec)
        runner = LocalRunner(spec, run.metadata.name, workers=workers)
    except (SpecError, StoreError) as err:
        print(f"{path}: {err}", file=sys.stderr)
        return 1
    errors = benchmark_errors(spec)
    if errors:  # hours before evaluate would find them
        print(f"{path}: invalid FusionRun:\n  " + "\n  ".join(errors), file=sys.stderr)
        return 1
    t0 = time.time()
    try:
        result = runner.run(force_stage=force_stage, on_task=_print_task, until=until)
    except RunFailed as err:
        print(f"run {run.metadata.name} FAILED: {err}", file=sys.stderr)
        return 1
    except (RunStopped, KeyboardInterrupt):
        print(f"run {run.metadata.name} stopped; rerun the same command to resume", file=sys.stderr)
        return 130
    except StoreError as err:
        print(f"run {run.metadata.name}: {err}", file=sys.stderr)
        return 1
    print(
        f"run {run.metadata.name} done in {time.time() - t0:.1f}s: {result.ran} ran, {result.skipped} skipped"
    )
    if result.report:
        print(f"report: {result.report}")
    return 0


def apply_env_overrides(spec: FusionRunSpec) -> FusionRunSpec:
    """FUSIONRUN_S3_ENDPOINT replaces store.endpoint of an S3 store (the same file against another server)."""
    endpoint = os.environ.get("FUSIONRUN_S3_ENDPOINT")
    if not endpoint or not spec.store.is_s3:
        return spec
    store = spec.store.model_copy(
        update={"endpoint": endpoint, "insecure": spec.store.insecure or endpoint.startswith("http://")}
    )
    return spec.model_copy(update={"store": store})


def _print_task(task_id: str, outcome: str, seconds: float) -> None:
    print(f"  {task_id:<28} {outcome:<8} {seconds:7.1f}s", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(
        prog="fusionrun", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a whole FusionRun on this machine")
    r.add_argument("file")
    r.add_argument("--force-stage", choices=STAGES, help="redo this stage and everything after it")
    r.add_argument("--workers", type=int, help="parallel tasks (default: fits the CPU cores)")
    r.add_argument("--until", choices=STAGES, help="stop after this stage (e.g. inspect fused shards)")
    v = sub.add_parser("validate", help="check a FusionRun file")
    v.add_argument("file")
    sub.add_parser("stage", help="run one task (python -m jobs ...)", add_help=False)
    sub.add_parser("crd", help="print or write the CRD (jobs.crd)", add_help=False)
    if argv and argv[0] == "stage":
        return stage_main(argv[1:])
    if argv and argv[0] == "crd":
        # Hook for the operator's CRD generator: everything after `crd` is its own command line.
        return int(importlib.import_module("jobs.crd").main(argv[1:]) or 0)
    args = ap.parse_args(argv)
    if args.cmd == "validate":
        return cmd_validate(args.file)
    return cmd_run(args.file, args.force_stage, args.workers, args.until)


if __name__ == "__main__":
    raise SystemExit(main())
