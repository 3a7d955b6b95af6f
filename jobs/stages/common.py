"""What every stage entrypoint shares: loading the spec, the task's context, reading verified inputs,
committing outputs + manifest, progress reporting.

A stage function takes a `StageContext`, writes its outputs with `ctx.output_path` / `ctx.add_output`, and
returns (counts, summary); `run_task` skips it when the task is already complete and writes the manifest
last when it returns. Inputs are read through `ctx.input_shard`, which checks the sha256 the producer
recorded: a corrupt input drops the producer's manifest (so that the next run redoes it) and fails with a
message naming the artifact.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from fusion.format import ShardError, read_shard, sha256_file, write_shard
from fusion.tokens import TokenizerView, adds_bos_by_default
from jobs.cache import (
    add_user,
    cache_of,
    drop_entry,
    held_lease,
    holder_id,
    located,
    publish,
    try_lease,
)
from jobs.cache import enabled as cache_enabled
from jobs.complete import (
    ManifestError,
    Output,
    Policy,
    adopt,
    build_manifest,
    content_key,
    input_digests,
    invalidate,
    manifest_key,
    read_manifest,
    text_stamps,
    why_incomplete,
    write_manifest,
)
from jobs.locations import fetch
from jobs.plan import build_dag
from jobs.registry import STAGES, CacheLayout, Layout, Stage, Task
from jobs.retry import TERMINATION_LOG_ENV, write_termination_message
from jobs.settings import Settings, SettingsError
from jobs.spec import (
    FusionRunSpec,
    SpecError,
    load_fusionrun,
    parse_spec,
    read_document,
    resolve_relative_paths,
)
from jobs.store import Store, StoreError, endpoint_of, open_store

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class StageError(RuntimeError):
    """A stage that cannot do its work; the message names the artifact or field and the fix. Retrying
    may help (exit 1): a corrupt input whose producer is being redone, an inconsistent store."""


class InputError(StageError):
    """Bad input: retrying cannot help (exit 2, jobs.retry): a model or tokenizer that will not load, a
    missing or empty corpus, spec settings the data cannot satisfy."""


def exit_code_for(err: Exception) -> int:
    """The process exit code of a stage that failed with `err` (jobs.retry's contract)."""
    if isinstance(err, SpecError | InputError | SettingsError) or (
        isinstance(err, StoreError) and err.permanent
    ):
        return EXIT_USAGE
    return EXIT_FAILED


def run_guarded(stage: str, body: Callable[[], int]) -> int:
    """Run a stage's process body (`python -m jobs <stage>`, training's launcher and ranks included) and
    end a failure every stage knows the same way: the message on stderr and as a JSON event, the
    termination message the operator and the local runner quote (`<stage>: <message>`), and the exit
    code jobs.retry's contract gives it (exit_code_for)."""
    try:
        return body()
    except (SpecError, StageError, StoreError, ManifestError, SettingsError) as err:
        log_event("failed", stage=stage, error=str(err))
        print(f"error: {err}", file=sys.stderr)
        # Read here, at the process's edge: the settings may be what failed to build.
        write_termination_message(f"{stage}: {err}", os.environ.get(TERMINATION_LOG_ENV))
        return exit_code_for(err)


def load_spec_and_name(
    spec_file: str | None, run_name: str | None, settings: Settings
) -> tuple[FusionRunSpec, str]:
    """The spec from --spec (a FusionRun YAML/JSON document, or a bare spec) or the settings' spec_json (env
    FUSIONRUN_SPEC, as Kubernetes Jobs get it); the run name from --run, the settings' run_name (env
    FUSIONRUN_NAME) or metadata.name."""
    name = run_name or settings.run_name
    if spec_file:
        path = Path(spec_file)
        try:
            doc = read_document(path)  # YAML (or JSON) read as kubectl reads it
        except SpecError as err:
            raise SpecError(f"--spec {err}") from None
        if isinstance(doc, dict) and "spec" in doc and "metadata" in doc:
            run = load_fusionrun(path)  # validates (errors name the field), resolves ./relative paths
            return run.spec, name or run.metadata.name
        if not isinstance(doc, dict):
            raise SpecError(f"--spec {path}: expected a FusionRun document or a spec mapping")
        spec = resolve_relative_paths(parse_spec(doc), path.parent.resolve())
    else:
        raw = settings.spec_json
        if not raw:
            raise SpecError("no spec: pass --spec FILE or set FUSIONRUN_SPEC to the spec as JSON")
        try:
            doc = json.loads(raw)
        except json.JSONDecodeError as err:
            raise SpecError(f"FUSIONRUN_SPEC is not valid JSON: {err}") from None
        spec = parse_spec(doc)
    if not name:
        raise SpecError("no run name: pass --run NAME or set FUSIONRUN_NAME (the FusionRun's metadata.name)")
    return spec, name


@dataclass
class StageContext:
    """What a stage function sees: the spec, its task, and its inputs and outputs by meaning (the store
    keys come from the registry's Layout; no stage formats a key or a task id)."""

    spec: FusionRunSpec
    run_name: str
    store: Store
    task: Task
    dag: list[Task]
    scratch: Path
    started_at: float = field(default_factory=time.time)
    outputs: dict[str, Output] = field(default_factory=dict)
    entry_prefix: str | None = None  # set while a cacheable task writes its shared entry (jobs.cache)

    @cached_property
    def by_id(self) -> dict[str, Task]:
        return {t.id: t for t in self.dag}

    @property
    def settings(self) -> Settings:
        """The process's settings (jobs.settings), which the run's store was opened with."""
        return self.store.settings

    @property
    def s3(self) -> Any:
        """The S3 service that reaches the run's s3:// models and texts (jobs.store.endpoint_of)."""
        return endpoint_of(self.store, self.spec.store)

    def dependency(self, stage: Stage, model: str | None = None, variant: str | None = None) -> Task:
        """The task of `stage` (for `model` / `variant`) that this task depends on."""
        for dep_id in self.task.deps:
            dep = self.by_id[dep_id]
            same_model = model is None or dep.model == model
            if dep.stage is stage and same_model and variant in (None, dep.variant or "fused"):
                return dep
        raise StageError(f"task {self.task.id} does not depend on {stage.value} {model or ''}".rstrip())

    def dependencies(self, stage: Stage) -> list[Task]:
        return [self.by_id[d] for d in self.task.deps if self.by_id[d].stage is stage]

    # ---- inputs
    def input_file(self, key: str, store: Store | None = None) -> Path:
        """A local path of a store object (the object itself for a local store, else a scratch copy)."""
        store = store or self.store
        local = store.local_path(key)
        if local is not None:
            return local
        dst = self.scratch / "in" / key
        if not dst.is_file():
            store.download(key, dst)
        return dst

    def input_shard(self, stage: Stage, model: str | None = None, variant: str | None = None) -> Any:
        """This task's input shard from `stage` (of `model`): documents, extraction, alignment or fusion
        of the same shard, verified against the checksum its producer recorded."""
        producer = self.dependency(stage, model, variant)
        key = Layout.documents(self.task.shard) if stage is Stage.prepare else Layout.shard(producer)
        return self.verified_shard(producer, key)

    def documents(self) -> Any:
        """The prepared documents (text) of this task's shard, whether prepare is a direct dependency or
        reached through extraction (align reads the text both models tokenized)."""
        return self.verified_shard(self.by_id[Task(Stage.prepare).id], Layout.documents(self.task.shard))

    def heldout(self) -> Any:
        """The held-out documents prepare set aside for evaluation."""
        return self.verified_shard(self.dependency(Stage.prepare), Layout.HELDOUT)

    def verified_shard(self, producer: Task, key: str) -> Any:
        """Open a shard `producer` wrote, verifying the checksum its manifest recorded.

        A missing, corrupt or foreign shard drops the producer's manifest, so that the next run redoes the
        producer (nothing complete is deleted: only the bad artifact's claim to be complete)."""
        kind = STAGES[producer.stage].shard_kind
        m = read_manifest(self.store, producer)
        if m is None or key not in m["outputs"]:
            raise StageError(
                f"input {self.store.uri_for(key)} has no manifest entry: run task {producer.id} first"
            )
        where, physical = located(self.store, m, key)
        try:
            return read_shard(self.input_file(physical, where), kind=kind, sha256=m["outputs"][key]["sha256"])
        except ShardError as err:
            invalidate(self.store, producer)
            if m.get("entry"):  # a corrupt shared entry is never used again: whoever needs it redoes it
                drop_entry(cache_of(self.store), producer.stage, m["cache_key"])
            raise StageError(
                f"input {self.store.uri_for(key)} of task {self.task.id} is unusable: {err}. "
                f"Its producer {producer.id} is marked incomplete: rerun the run (or "
                f"`python -m jobs {' '.join(producer.args())}`) to redo it"
            ) from None

    # ---- outputs
    def _physical(self, key: str) -> tuple[Store, str]:
        """Where an output goes: the task's entry in the shared cache (cacheable stages), else the run."""
        if self.entry_prefix is None:
            return self.store, key
        return cache_of(self.store), CacheLayout.at(self.entry_prefix, CacheLayout.file(self.task.stage, key))

    def output_path(self, key: str) -> Path:
        """Where to write an output: its final place in a local store (writers are atomic), else scratch."""
        where, physical = self._physical(key)
        local = where.local_path(physical)
        if local is not None:
            local.parent.mkdir(parents=True, exist_ok=True)
            return local
        p = self.scratch / "out" / physical
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def add_output(self, key: str, path: Path, sha256: str | None = None) -> None:
        """Record an output written at `path` (from output_path) and upload it when the store is remote."""
        digest = sha256 or sha256_file(path)
        where, physical = self._physical(key)
        if where.local_path(physical) != path:
            where.upload(path, physical)
        self.outputs[key] = Output(digest, path.stat().st_size)

    def write_shard(self, arrays: dict[str, Any], meta: dict[str, Any], key: str | None = None) -> Any:
        """Write one of this task's shards (default: the task's own shard key) and record it."""
        key = key or Layout.shard(self.task)
        path = self.output_path(key)
        info = write_shard(path, STAGES[self.task.stage].shard_kind, arrays, meta=meta)
        self.add_output(key, path, info.sha256)
        return info

    def put_json(self, key: str, obj: Any) -> None:
        import hashlib

        data = json.dumps(obj, indent=1, sort_keys=True).encode()
        self.store.put_bytes(key, data)
        self.outputs[key] = Output(hashlib.sha256(data).hexdigest(), len(data))


StageFn = Callable[[StageContext], tuple[dict[str, Any], dict[str, Any]]]


Work = Callable[[str | None, dict[str, str]], "dict[str, Any] | int"]


def complete_task(
    store: Store,
    spec: FusionRunSpec,
    dag: list[Task],
    task: Task,
    force: bool,
    work: Work,
    writer: bool = True,
) -> int:
    """The one sequence every task goes through (jobs.complete's rule): skip it when complete (unless
    forced); record its inputs' digests (failing clearly when a dependency is not done); drop a stale
    manifest before its outputs are rewritten; do the work; write the manifest LAST.

    work(reason, inputs) returns the manifest to write, or an exit code when there is none to write (a
    preempted training). writer: False for the ranks of a training that are not rank 0 (they train, rank 0
    alone touches the manifest)."""
    by_id = {t.id: t for t in dag}
    reason = why_incomplete(store, spec, task, by_id, Policy.for_store(store))
    if reason is None and not force:
        log_event("skip", task=task.id, reason="complete")
        return EXIT_OK
    inputs = input_digests(store, by_id, task)
    if writer and reason != "no manifest":
        invalidate(store, task)  # a stale manifest must not vouch for outputs being rewritten
    if writer:
        record_spec(store, spec)
    started = time.time()
    log_event("start", task=task.id, reason=reason or "forced")
    manifest = work(reason, inputs)
    if isinstance(manifest, int):
        return manifest
    write_manifest(store, task, manifest)
    log_event("done", task=task.id, seconds=round(time.time() - started, 2), **manifest["counts"])
    return EXIT_OK


def run_task(
    stage_fn: StageFn,
    task: Task,
    spec: FusionRunSpec,
    run_name: str,
    force: bool = False,
    store: Store | None = None,
    settings: Settings | None = None,
) -> int:
    """Run one task unless complete (complete_task). A task of a cacheable stage adopts the shared entry
    of its content key when one exists (jobs.cache), else writes it under the entry's lease. Returns a
    process exit code. The run's store (opened with `settings`, default: jobs.settings' defaults) unless
    given (then its own settings hold)."""
    store = store or open_store(spec.store, run_name, settings or Settings(), check=spec.store.is_s3)
    dag = build_dag(spec)
    by_id = {t.id: t for t in dag}
    if task.id not in by_id:
        raise StageError(f"task {task.id} is not part of this run (known: {', '.join(sorted(by_id))})")
    task = by_id[task.id]  # with its dependencies

    def work(reason: str | None, inputs: dict[str, str]) -> dict[str, Any]:
        scratch = Path(tempfile.mkdtemp(prefix=f"fusionrun-{task.id}-"))
        try:
            ctx = StageContext(spec, run_name, store, task, dag, scratch)
            if cache_enabled(task, store.settings):
                return _run_cached(stage_fn, ctx, inputs, force)
            return _run_plain(stage_fn, ctx, inputs)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    return complete_task(store, spec, dag, task, force, work)


def _run_plain(stage_fn: StageFn, ctx: StageContext, inputs: dict[str, str]) -> dict[str, Any]:
    stamps = text_stamps(ctx.store, ctx.spec, ctx.task)  # before reading: an edit meanwhile redoes it
    counts, summary = stage_fn(ctx)
    return build_manifest(
        ctx.spec,
        ctx.task,
        outputs=ctx.outputs,
        inputs=inputs,
        started_at=ctx.started_at,
        counts=counts,
        summary=summary | stamps,
    )


def _run_cached(stage_fn: StageFn, ctx: StageContext, inputs: dict[str, str], force: bool) -> dict[str, Any]:
    """Adopt the entry of the task's content key, or make it: one writer (the lease), the others wait."""
    store, spec, task = ctx.store, ctx.spec, ctx.task
    key = content_key(store, spec, task, ctx.by_id)
    cache, holder = cache_of(store), holder_id(ctx.run_name, task.id)
    while True:
        adopted = None if force else adopt(store, spec, task, ctx.by_id, ctx.run_name, key)
        if adopted is not None:
            made = adopted["summary"].get("reused_from") or {}
            log_event("reused", task=task.id, key=key[:16], run=made.get("run"), task_from=made.get("task"))
            return adopted
        busy = try_lease(cache, task.stage, key, holder)
        if busy is None:
            break
        log_event("waiting", task=task.id, key=key[:16], holder=busy)
        time.sleep(store.settings.cache_poll_seconds)
    with held_lease(cache, task.stage, key, holder):
        ctx.entry_prefix = CacheLayout.entry(task.stage, key)
        stamps = text_stamps(store, spec, task)
        counts, summary = stage_fn(ctx)
        files = {CacheLayout.file(task.stage, k): o for k, o in ctx.outputs.items()}
        made = {
            "counts": counts,
            "summary": summary | stamps,
            "created_by": {"run": ctx.run_name, "task": task.id},
        }
        entry = publish(cache, task.stage, key, files, made)
    manifest = build_manifest(
        spec,
        task,
        outputs=ctx.outputs,
        inputs=inputs,
        started_at=ctx.started_at,
        counts=counts,
        summary=summary | stamps,
    )
    manifest |= {"entry": entry.prefix, "cache_key": key}
    add_user(cache, entry, ctx.run_name, manifest_key(task))
    return manifest


def record_spec(store: Store, spec: FusionRunSpec) -> None:
    """Keep the spec the run's tasks run with in the store, so that `fusionrun status/report NAME` can
    read a run made by either backend (the spec holds Secret names, never their values)."""
    data = spec.model_dump_json(by_alias=True, exclude_none=True, indent=1).encode()
    try:
        if store.exists(Layout.SPEC) and store.get_bytes(Layout.SPEC) == data:
            return
        store.put_bytes(Layout.SPEC, data)
    except Exception as err:  # informational only: never fail a task over it
        log_event("warning", what=f"could not record the spec at {store.uri_for(Layout.SPEC)}: {err}")


def log_event(event: str, **fields: Any) -> None:
    """One structured JSON line on stderr (machine-readable in Kubernetes logs and the local runner's)."""
    print(json.dumps({"event": event, "time": round(time.time(), 3), **fields}), file=sys.stderr, flush=True)


class Progress:
    """Progress of a long loop: a tqdm bar on a terminal, else a JSON line every `every` percent."""

    def __init__(self, total: int, task: str, unit: str = "docs", every: float = 10.0):
        self.total, self.task, self.unit, self.every = max(total, 1), task, unit, every
        self.done, self._next = 0, every
        self._bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=task, unit=unit, file=sys.stderr)
            except ImportError:
                self._bar = None
        self._t0 = time.time()

    def __call__(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        pct = 100.0 * self.done / self.total
        if pct >= self._next or self.done >= self.total:
            log_event(
                "progress",
                task=self.task,
                done=self.done,
                total=self.total,
                unit=self.unit,
                percent=round(pct, 1),
                seconds=round(time.time() - self._t0, 2),
            )
            while self._next <= pct:
                self._next += self.every

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def model_location(ctx: StageContext, uri: str | None) -> str | None:
    """A path (or hub id) fusion can load: s3:// folders are downloaded (cached), pkg:// resolved."""
    if uri is None:
        return None

    try:
        return fetch(uri, ctx.s3, kind="model")
    except StoreError as err:
        raise (InputError if err.permanent else StageError)(f"model at {uri}: {err}") from None


def load_model_tokenizer(ctx: StageContext, name: str) -> tuple[Any, Any]:
    """The tokenizer and its TokenizerView of a spec model; errors name the model and the field to fix."""
    from fusion.hub import load_tokenizer

    m = ctx.spec.model(name)
    uri = m.tokenizer_uri
    loc = model_location(ctx, uri)
    try:
        tok = load_tokenizer(loc, m.gguf_file)
        return tok, TokenizerView.from_tokenizer(tok)
    except Exception as err:
        field = "tokenizer" if m.tokenizer else "uri"
        raise InputError(
            f"model {name}: cannot load its tokenizer from {uri} ({err}); fix {field} of model "
            f"{name} in the spec"
        ) from None


def adds_bos(ctx: StageContext, name: str, tok: Any) -> bool:
    """Whether documents start with BOS for model `name`: its addBos, else its tokenizer's own default."""

    flag = ctx.spec.model(name).add_bos
    return adds_bos_by_default(tok) if flag is None else flag


def load_spec_model(
    ctx: StageContext,
    name: str,
    *,
    vocab_size: int,
    eos_id: int | None,
    device: str | None = None,
    dtype: str | None = None,
) -> Any:
    """The spec model `name` (weights or randomInit) on `device` in `dtype` (default: extraction's):
    every stage that loads a spec model (extract, train, evaluate) loads it here, so a model that will
    not load fails each of them with the same message and exit code (load_model_at)."""
    m = ctx.spec.model(name)
    ri = m.random_init.model_dump() if m.random_init is not None else None
    return load_model_at(
        None if ri is not None else model_location(ctx, m.uri),
        what=f"model {name} ({m.uri or 'randomInit'})",
        fix=f"Fix uri/ggufFile/randomInit of model {name} in the spec",
        gguf_file=m.gguf_file if ri is None else None,
        random_init=ri,
        vocab_size=vocab_size,
        eos_id=eos_id,
        device=device or ctx.spec.extraction.device,
        dtype=dtype or ctx.spec.extraction.dtype,
    )


def load_model_at(
    path: str | None,
    *,
    what: str,
    fix: str,
    vocab_size: int,
    device: str,
    dtype: str,
    eos_id: int | None = None,
    gguf_file: str | None = None,
    random_init: dict[str, Any] | None = None,
) -> Any:
    """THE model loader of the stages (a spec model, or a model this run trained), with THE rule for a
    model that will not load: out of memory may pass on another node or after others finish (StageError,
    retried); anything else is a wrong path, file or architecture (InputError, exit 2: retrying cannot
    help). The message: `<what> will not load: <why>. <fix>`."""
    from fusion.models import load_model

    try:
        return load_model(
            path,
            gguf_file,
            random_init=random_init,
            vocab_size=vocab_size,
            device=device,
            dtype=dtype,
            eos_token_id=eos_id,
        )
    except Exception as err:
        oom = isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"
        raise (StageError if oom else InputError)(f"{what} will not load: {err}. {fix}") from None


def set_threads(settings: Settings) -> int:
    """Torch intra-op threads from the settings (FUSIONRUN_THREADS / OMP_NUM_THREADS: the local runner's
    share); torch's own choice without."""
    import torch

    n = settings.threads
    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()
