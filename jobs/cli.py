"""The `fusionrun` command.

fusionrun run FILE.yaml [--force-stage S] [--workers N]   the whole run on this machine (jobs.local)
fusionrun validate FILE.yaml                              check a FusionRun; errors name the field
fusionrun stage <stage> [--model M] [--shard N] ...       one task (= python -m jobs ...)
fusionrun status FILE.yaml | NAME --store URI             a run's status, from its store (either backend)
fusionrun report FILE.yaml | NAME --store URI             a run's report, from its store
fusionrun cache ls|prune FILE.yaml | STORE_URI            outputs shared across runs (extract once)
fusionrun crd [...]                                       the CRD generated from the spec (jobs.crd)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.benchmarks import light_errors
from jobs.cache import list_entries, live_users, prune
from jobs.local import LocalRunner, RunFailed, RunStopped, ignored_locally
from jobs.observe import recorded_spec, store_status
from jobs.plan import build_dag
from jobs.registry import (
    STAGE_NAMES,
    STAGES,
    CacheLayout,
    Layout,
    Stage,
    StageDef,
    Task,
    Variant,
    shard_at_index,
)
from jobs.report import write_report
from jobs.settings import Settings, SettingsError
from jobs.spec import SpecError, StoreSpec, format_validation_error, load_fusionrun
from jobs.stages.common import (
    InputError,
    load_spec_and_name,
    run_guarded,
    run_task,
)
from jobs.store import StoreError, open_store

if TYPE_CHECKING:
    from jobs.spec import FusionRunSpec


def stage_parser(prog: str = "python -m jobs") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Run one FusionRun task (as a Kubernetes Job)")
    ap.add_argument("stage", choices=STAGE_NAMES)
    ap.add_argument("--model", help="extract: any model; align: a source model")
    ap.add_argument("--shard", type=int, help="shard number (extract, align, fuse)")
    ap.add_argument(
        "--shard-from-index",
        action="store_true",
        help="the shard is entry JOB_COMPLETION_INDEX of FUSIONRUN_SHARDS (a pod of an Indexed Job)",
    )
    ap.add_argument(
        "--variant",
        choices=[v.value for v in Variant],
        help="train and fuse: fused (FuseLLM, the default) or a baseline: clm, self, sources",
    )
    ap.add_argument("--spec", help="FusionRun YAML/JSON file (default: env FUSIONRUN_SPEC, JSON of the spec)")
    ap.add_argument("--run", help="run name (default: env FUSIONRUN_NAME or the file's metadata.name)")
    ap.add_argument("--force", action="store_true", help="rerun even when the task is complete")
    return ap


def _check_task_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.shard_from_index:
        if args.shard is not None:
            ap.error("give --shard N or --shard-from-index, not both")
        try:
            args.shard = shard_at_index(os.environ)
        except ValueError as err:
            ap.error(str(err))
    d = STAGES[Stage(args.stage)]
    if d.per_model and not args.model:
        ap.error(f"{args.stage} needs --model NAME")
    if d.per_shard and args.shard is None:
        ap.error(f"{args.stage} needs --shard N")
    if not d.per_model and args.model:
        ap.error(f"{args.stage} takes no --model")
    if not d.per_shard and args.shard is not None:
        ap.error(f"{args.stage} takes no --shard")
    if args.variant and not d.per_variant:
        with_variants = " and ".join(s.value for s, sd in STAGES.items() if sd.per_variant)
        ap.error(f"--variant is for {with_variants} only")
    if args.variant and Variant(args.variant) not in d.variants:
        has = ", ".join(v.value for v in d.variants)
        ap.error(f"{args.stage} --variant {args.variant}: {args.stage} has the variants {has} only")


def stage_main(argv: list[str] | None = None, settings: Settings | None = None) -> int:
    """Entry of `python -m jobs`: run one task; exit codes as jobs.retry says (0 done or skipped, 1 failed,
    2 bad input: no retry can help), the message on stderr (jobs.stages.common.run_guarded). settings:
    `fusionrun stage` passes its own; else they are read from the environment here (jobs.settings)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = stage_parser()
    args = ap.parse_args(argv)
    _check_task_args(ap, args)
    d = STAGES[Stage(args.stage)]
    if d.distributed:
        # Training owns its own process layout (DeepSpeed ranks, checkpoints, manifest); it ends a failure
        # as every stage does (run_guarded).
        return int(importlib.import_module(d.module).main(argv[1:]) or 0)
    return run_guarded(args.stage, lambda: _run_stage(args, d, settings))


def _run_stage(args: argparse.Namespace, d: StageDef, settings: Settings | None) -> int:
    settings = settings or Settings.from_env(os.environ)
    spec, name = load_spec_and_name(args.spec, args.run, settings)
    if args.model and args.model not in {m.name for m in spec.models}:
        raise InputError(
            f"--model {args.model}: no such model in the spec; known: {[m.name for m in spec.models]}"
        )
    if d.sources_only and args.model == spec.target.name:
        raise InputError(f"--model {args.model} is the target; {args.stage} takes a source model")
    if args.shard is not None and not 0 <= args.shard < spec.extraction.shards:
        raise InputError(f"--shard {args.shard}: the run has extraction.shards={spec.extraction.shards}")
    task = Task(Stage(args.stage), model=args.model, shard=args.shard, variant=args.variant)
    return run_task(
        importlib.import_module(d.module).run, task, spec, name, force=args.force, settings=settings
    )


def cmd_validate(path: str) -> int:
    warnings: list[str] = []
    try:
        run = load_fusionrun(path, warnings)
    except SpecError as err:
        print(err, file=sys.stderr)  # names the file once
        return 1
    finally:
        for w in warnings:
            print(f"note: {path}: {w}", file=sys.stderr)
    errors = benchmark_errors(run.spec)
    if errors:
        print(f"{path}: invalid FusionRun:\n  " + "\n  ".join(errors), file=sys.stderr)
        return 1
    dag = build_dag(run.spec)
    print(
        f"{path}: valid FusionRun {run.metadata.name!r}: {len(run.spec.models)} models, "
        f"{run.spec.extraction.shards} shard(s), {len(dag)} tasks"
    )
    _note_ignored(run.spec)
    return 0


def _note_ignored(spec: FusionRunSpec) -> None:
    ignored = ignored_locally(spec)
    if ignored:
        print(
            f"note: `fusionrun run` (no cluster) ignores the Kubernetes-only field(s) {', '.join(ignored)}; "
            "the operator applies them",
            file=sys.stderr,
        )


def benchmark_errors(spec: FusionRunSpec) -> list[str]:
    """evaluation.tasks / taskDirs problems found before anything runs (jobs.benchmarks.light_errors)."""
    if not spec.evaluation.enabled or not spec.evaluation.tasks:
        return []
    return light_errors(spec)


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    path, until = args.file, args.until
    try:
        run = load_fusionrun(path)
        spec = apply_env_overrides(run.spec, settings)
        runner = LocalRunner(spec, run.metadata.name, workers=args.workers, settings=settings)
    except SpecError as err:
        print(err, file=sys.stderr)  # names the file once
        return 1
    except StoreError as err:
        print(f"{path}: {err}", file=sys.stderr)
        return 1
    errors = benchmark_errors(spec)
    if errors:  # hours before evaluate would find them
        print(f"{path}: invalid FusionRun:\n  " + "\n  ".join(errors), file=sys.stderr)
        return 1
    _note_ignored(spec)
    t0 = time.time()
    try:
        result = runner.run(force_stage=args.force_stage, on_task=_print_task, until=until)
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
        f"run {run.metadata.name} done in {time.time() - t0:.1f}s: {result.ran} ran, "
        f"{result.skipped} skipped, {result.reused} reused from other runs"
    )
    if result.report:
        print(f"report: {result.report}")
    return 0


def open_run(args: argparse.Namespace, settings: Settings) -> tuple[FusionRunSpec, str, Any]:
    """(spec, run name, store) of `fusionrun status/report TARGET`: TARGET is a FusionRun file (its store
    and name), or a run's name with --store (the spec its tasks recorded in the store)."""
    from pydantic import ValidationError

    if Path(args.target).is_file():
        run = load_fusionrun(args.target)
        spec = apply_env_overrides(run.spec, settings)
        store = open_store(spec.store, run.metadata.name, settings, check=spec.store.is_s3)
        return spec, run.metadata.name, store
    if not args.store:
        raise SpecError(f"{args.target}: no such file; for a run's name, give its store with --store URI")
    try:
        where = StoreSpec(uri=args.store, endpoint=args.endpoint, region=args.region, insecure=args.insecure)
    except ValidationError as err:
        msg = format_validation_error(err, root="--store").replace("invalid FusionRun", "invalid store")
        raise SpecError(f"{args.target}: {msg}") from None
    store = open_store(apply_env_overrides_store(where, settings), args.target, settings, check=where.is_s3)
    try:
        spec = recorded_spec(store)
    except SpecError as err:
        raise SpecError(f"{args.target}: the spec recorded in its store: {err}") from None
    if spec is None:
        raise SpecError(
            f"no run {args.target!r} at {store.base_uri}: no recorded spec ({store.uri_for(Layout.SPEC)}); "
            "check --store and the name, or wait until its first task has started"
        )
    return spec, args.target, store


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    spec, name, store = open_run(args, settings)
    status = store_status(store, spec)
    if args.json:
        print(json.dumps(status.to_k8s(), indent=1, sort_keys=True))
        return 0
    print(f"{name}: {status.phase} ({status.progress}) - {status.message}")
    for stage in STAGE_NAMES:
        st = getattr(status.stages, stage)
        if st.state != "Skipped":
            print(f"  {stage:<9} {st.state:<10} {st.succeeded}/{st.tasks} tasks")
    for p in status.training:
        loss = f", loss {p.loss:.4f}" if p.loss is not None else ""
        print(f"  train {p.variant}: step {p.step}/{p.total_steps} ({p.percent:.0f}%){loss}")
    for t in status.tasks:
        if t.state in ("Failed", "Retrying"):
            print(f"  {t.id}: {t.state}: {t.message or t.reason or ''}")
    print(f"artifacts: {status.artifacts_uri}")
    return 0


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    spec, name, store = open_run(args, settings)
    out = Path(args.out) if args.out else Path.cwd() / "runs" / name / "report"
    path = write_report(store, spec, name, out)
    print(f"report: {path}")
    return 0


def parse_age(text: str) -> float:
    """'30d', '12h', '45m', '90s' (or plain seconds) -> seconds."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    text = text.strip().lower()
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an age such as 30d, 12h, 45m or 90s") from None


def open_cache(args: argparse.Namespace, settings: Settings) -> Any:
    """The shared cache area (jobs.cache) of a store given as a FusionRun file or a store URI."""
    if Path(args.target).is_file():
        where = apply_env_overrides(load_fusionrun(args.target).spec, settings).store
    else:
        where = StoreSpec(uri=args.target, endpoint=args.endpoint, region=args.region, insecure=args.insecure)
    return open_store(
        apply_env_overrides_store(where, settings), CacheLayout.AREA, settings, check=where.is_s3
    )


def cmd_cache(args: argparse.Namespace, settings: Settings) -> int:
    cache = open_cache(args, settings)
    if args.action == "ls":
        now = time.time()
        print(f"{'entry':<34} {'bytes':>12} {'last use':>9}  made by / used by")
        for e in list_entries(cache):
            age = f"{(now - e.last_used) / 86400:.1f}d" if e.last_used else "-"
            made = e.created_by.get("run", "partial" if not e.complete else "?")
            users = ",".join(live_users(cache, e)) or "-"
            print(f"{e.prefix[:34]:<34} {e.bytes:>12} {age:>9}  {made} / {users}")
        return 0
    if args.older_than is None and not args.keep_used:
        print("cache prune: say --older-than AGE (e.g. 30d) and/or --keep-used", file=sys.stderr)
        return 2
    gone = prune(cache, args.older_than, args.keep_used, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {len(gone)} entries, {sum(e.bytes for e in gone)} bytes")
    for e in gone:
        print(f"  {e.prefix}")
    return 0


def apply_env_overrides_store(store: Any, settings: Settings) -> Any:
    """The settings' s3.endpoint (FUSIONRUN_S3_ENDPOINT) replaces the endpoint of an S3 store spec (see
    apply_env_overrides)."""
    endpoint = settings.s3.endpoint
    if not endpoint or not store.is_s3:
        return store
    return store.model_copy(
        update={"endpoint": endpoint, "insecure": store.insecure or endpoint.startswith("http://")}
    )


def apply_env_overrides(spec: FusionRunSpec, settings: Settings) -> FusionRunSpec:
    """The settings' s3.endpoint (FUSIONRUN_S3_ENDPOINT) replaces store.endpoint of an S3 store (the same
    file against another server)."""
    store = apply_env_overrides_store(spec.store, settings)
    return spec if store is spec.store else spec.model_copy(update={"store": store})


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
    r.add_argument("--force-stage", choices=STAGE_NAMES, help="redo this stage and everything after it")
    r.add_argument("--workers", type=int, help="parallel tasks (default: fits the CPU cores)")
    r.add_argument("--until", choices=STAGE_NAMES, help="stop after this stage (e.g. inspect fused shards)")
    v = sub.add_parser("validate", help="check a FusionRun file")
    v.add_argument("file")
    for name, what in (("status", "show a run's status"), ("report", "write a run's report")):
        c = sub.add_parser(name, help=f"{what}, from its store (a run made locally or on Kubernetes)")
        c.add_argument("target", help="a FusionRun file, or a run's name with --store")
        c.add_argument("--store", help="the store URI (spec.store.uri) when TARGET is a run's name")
        c.add_argument("--endpoint", help="S3 endpoint of --store")
        c.add_argument("--region", help="S3 region of --store")
        c.add_argument("--insecure", action="store_true", help="allow a plain http:// endpoint")
        if name == "status":
            c.add_argument("--json", action="store_true", help="the status object, as the operator writes it")
        else:
            c.add_argument("--out", help="local folder for the report (default: ./runs/NAME/report)")
    c = sub.add_parser("cache", help="list or prune the outputs shared across runs (jobs.cache)")
    c.add_argument("action", choices=["ls", "prune"])
    c.add_argument("target", help="a FusionRun file (its store), or a store URI (spec.store.uri)")
    c.add_argument("--endpoint", help="S3 endpoint of the store URI")
    c.add_argument("--region", help="S3 region of the store URI")
    c.add_argument("--insecure", action="store_true", help="allow a plain http:// endpoint")
    c.add_argument("--older-than", type=parse_age, help="prune: entries not used for this long (30d, 12h)")
    c.add_argument("--keep-used", action="store_true", help="prune: every entry no run's manifest uses")
    c.add_argument("--dry-run", action="store_true", help="prune: only say what would go")
    sub.add_parser("stage", help="run one task (python -m jobs ...)", add_help=False)
    sub.add_parser("crd", help="print or write the CRD (jobs.crd)", add_help=False)
    if argv and argv[0] == "stage":
        return stage_main(argv[1:])  # reads its settings itself, as `python -m jobs` does
    if argv and argv[0] == "crd":
        # Hook for the operator's CRD generator: everything after `crd` is its own command line.
        return int(importlib.import_module("jobs.crd").main(argv[1:]) or 0)
    args = ap.parse_args(argv)
    if args.cmd == "validate":
        return cmd_validate(args.file)
    try:
        settings = Settings.from_env(os.environ)  # the one place this command reads the environment
    except SettingsError as err:
        print(f"fusionrun: {err}", file=sys.stderr)
        return 2
    if args.cmd in ("status", "report", "cache"):
        command = {"status": cmd_status, "report": cmd_report, "cache": cmd_cache}[args.cmd]
        try:
            return command(args, settings)
        except SpecError as err:
            print(err, file=sys.stderr)  # names the file or the run once
            return 1
        except StoreError as err:
            print(f"{args.target}: {err}", file=sys.stderr)
            return 1
    return cmd_run(args, settings)


if __name__ == "__main__":
    raise SystemExit(main())
