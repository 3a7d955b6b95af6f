"""The `train` stage: continual training of the target on the fused shards (or the CLM-only baseline).

    python -m jobs train [--variant fused|clm] [--spec FILE] [--run NAME] [--force]

Process layout (no ssh, no MPI):
- RANK set (torchrun, or one pod per rank as the operator starts them): this process is that rank.
- no RANK, procs_per_node > 1 (NPROC_PER_NODE or the spec): this process is a node's launcher; it starts
  procs_per_node ranks with RANK = NODE_RANK * procs_per_node + i, LOCAL_RANK = i, waits, and exits with
  the ranks' verdict. One failed rank stops the others (the group restarts from the last checkpoint).
- nothing set: one local process, RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 and a free port.

Every rank trains (fusion.train.loop.Trainer). Rank 0 publishes progress and the training history to the
store through the reporter injected here (StoreRecorder: jobs.progress's records), uploads the exported
model to `train/<variant>/model/` and writes the task manifest last. Exit codes: 0 done (or already
complete), 1 failed, 75 preempted (SIGTERM: checkpoint saved, rerun to continue).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusion.train.config import TrainConfig, use_bf16
from fusion.train.reporting import EndState, StepMetrics
from jobs.complete import Output, build_manifest, fingerprint, read_manifest
from jobs.plan import build_dag, trained_variants
from jobs.progress import (
    ProgressRecord,
    ProgressState,
    StepRow,
    TrainingHistory,
    history_key,
    progress_key,
    read_history,
)
from jobs.registry import Layout, Stage, Task, Variant
from jobs.settings import Settings
from jobs.spec import SpecError
from jobs.store import open_store

EXIT_PREEMPTED = 75  # = fusion.train.loop.EXIT_PREEMPTED (kept here so the launcher needs no torch import)
PROGRESS_INTERVAL_S = 10.0  # progress.json is rewritten at most this often (and at the last step)


# --------------------------------------------------------------------------------------------------
# TrainConfig from the spec: derived by field name, so that a new field cannot be silently dropped

# spec.training field -> TrainConfig field, where the names differ
RENAMED_FIELDS: dict[str, str] = {"lambda_": "lam", "lambda_final": "lam_final", "loss": "loss_kind"}
# spec.training fields that shape the launch or the DAG, not the training of one variant
NOT_TRAINING_FIELDS: frozenset[str] = frozenset(
    {"nodes", "procs_per_node", "clm_baseline", "self_distill_baseline", "sources_only_baseline"}
)


def train_config(spec: Any, variant: str) -> TrainConfig:
    """The typed training config of a FusionRun spec (`spec.training`) for one variant: every training
    field under its TrainConfig name (a spec field TrainConfig lacks is a TypeError, not a silent drop).
    The trainer knows two losses: CLM-only, and towards fused targets (whichever teachers made them:
    FuseLLM's candidates, the target alone for self-distillation, the sources alone)."""
    variant = Variant.clm.value if variant == Variant.clm.value else Variant.fused.value
    t = spec.training
    values = {
        RENAMED_FIELDS.get(name, name): getattr(t, name)
        for name in type(t).model_fields
        if name not in NOT_TRAINING_FIELDS
    }
    return TrainConfig(variant=variant, **values)


# --------------------------------------------------------------------------------------------------
# launch shape (pure decisions)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_envs(
    environ: dict[str, str], procs_per_node: int, nodes: int, port: int | None = None
) -> list[dict[str, str]] | None:
    """None when this process already is a rank (RANK set); else the environment of each rank to start
    here: procs_per_node ranks of node NODE_RANK (a single local rank when nothing is set)."""
    if environ.get("RANK") is not None:
        return None
    ppn = int(environ.get("NPROC_PER_NODE") or procs_per_node)
    n_nodes = int(environ.get("NNODES") or nodes)
    node = int(environ.get("NODE_RANK") or 0)
    world = int(environ.get("WORLD_SIZE") or ppn * n_nodes)
    if world != ppn * n_nodes:
        raise ValueError(
            f"WORLD_SIZE={world} but nodes x procs_per_node = {n_nodes} x {ppn}: fix the "
            "launcher's environment or training.nodes / training.procsPerNode"
        )
    if not 0 <= node < n_nodes:
        raise ValueError(f"NODE_RANK={node} is outside 0..{n_nodes - 1} (training.nodes = {n_nodes})")
    addr = environ.get("MASTER_ADDR")
    if addr is None and n_nodes > 1:
        raise ValueError("multi-node training needs MASTER_ADDR (rank 0's address) in the environment")
    master_port = environ.get("MASTER_PORT") or (str(port) if port is not None else None)
    if master_port is None:
        if n_nodes > 1:
            raise ValueError("multi-node training needs MASTER_PORT in the environment")
        master_port = str(free_port())
    base = {"MASTER_ADDR": addr or "127.0.0.1", "MASTER_PORT": master_port, "WORLD_SIZE": str(world)}
    threads = environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // ppn))
    return [
        {
            **base,
            "RANK": str(node * ppn + i),
            "LOCAL_RANK": str(i),
            "NODE_RANK": str(node),
            "OMP_NUM_THREADS": threads,
        }
        for i in range(ppn)
    ]


def group_exit_code(codes: list[int | None]) -> int:
    """One verdict for a node's ranks: 0 when all finished, 75 when preempted (and none failed), else 1."""
    if all(c == 0 for c in codes):
        return 0
    if all(c in (0, EXIT_PREEMPTED) for c in codes):
        return EXIT_PREEMPTED
    return 1


def launch_ranks(argv: list[str], envs: list[dict[str, str]]) -> int:
    """Start one process per rank environment (this same command), forward SIGTERM, stop the group when a
    rank fails, and return the group's exit code."""
    procs = [
        subprocess.Popen([sys.executable, "-m", "jobs", Stage.train.value, *argv], env={**os.environ, **e})
        for e in envs
    ]

    def forward(signum: int, frame: Any) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    while any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0, EXIT_PREEMPTED) for p in procs):
            time.sleep(2.0)  # let the peers notice, then stop them: a rank alone waits in collectives
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.2)
    return group_exit_code([p.returncode for p in procs])


# --------------------------------------------------------------------------------------------------
# progress and history in the store: the trainer's reporter


def _utc_iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def progress_record(m: StepMetrics, state: ProgressState, updated_at: str) -> ProgressRecord:
    return ProgressRecord(
        step=m.step,
        total_steps=m.total_steps,
        loss=m.loss,
        clm_loss=m.clm_loss,
        fusion_loss=m.fusion_loss,
        tokens_per_second=m.tokens_per_second,
        learning_rate=m.learning_rate,
        eta_seconds=m.eta_seconds,
        updated_at=updated_at,
        state=state,
    )


def step_row(m: StepMetrics, logged_at: str) -> StepRow:
    return StepRow(
        step=m.step,
        loss=m.loss,
        clm_loss=m.clm_loss,
        fusion_loss=m.fusion_loss,
        learning_rate=m.learning_rate,
        tokens_per_second=m.tokens_per_second,
        tokens=m.tokens,
        time=logged_at,
    )


class StoreRecorder:
    """The reporter the train stage injects (fusion.train.reporting.TrainReporter; rank 0 only):
    progress.json at most every `interval_s` seconds and at the last step, history.jsonl at each attempt's
    start, at each checkpoint (before its marker) and at the end. Both are whole-object atomic puts (S3 has
    no append): the history is rewritten whole, some 200 bytes per step, at checkpoints only."""

    def __init__(
        self,
        store: Any,
        variant: str,
        interval_s: float = PROGRESS_INTERVAL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store, self.variant, self.interval_s, self.clock = store, variant, interval_s, clock
        self.history = TrainingHistory()
        self._progress_at = -math.inf

    def attempt_started(self, start_step: int, total_steps: int, world_size: int) -> None:
        self.history = read_history(self.store, self.variant) or TrainingHistory()
        self.history.start_attempt(start_step, total_steps, world_size, _utc_iso(self.clock()))
        self._put_history()

    def step(self, metrics: StepMetrics) -> None:
        now = self.clock()
        self.history.add_step(step_row(metrics, _utc_iso(now)))
        if now - self._progress_at >= self.interval_s or metrics.step == metrics.total_steps:
            self._put_progress(metrics, "running")

    def checkpoint(self, step: int) -> None:
        self._put_history()

    def finished(self, metrics: StepMetrics | None, state: EndState) -> None:
        if metrics is not None:
            self._put_progress(metrics, state)
        self._put_history()

    def _put_progress(self, metrics: StepMetrics, state: ProgressState) -> None:
        self._progress_at = self.clock()
        record = progress_record(metrics, state, _utc_iso(self._progress_at))
        self.store.put_bytes(progress_key(self.variant), record.to_bytes())

    def _put_history(self) -> None:
        self.store.put_bytes(history_key(self.variant), self.history.to_jsonl().encode())


# --------------------------------------------------------------------------------------------------
# the stage


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m jobs train")
    ap.add_argument("--variant", choices=[v.value for v in Variant], default="fused")
    ap.add_argument("--spec")
    ap.add_argument("--run")
    ap.add_argument("--force", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs train ...`: a failure ends as every stage's does (common.run_guarded)."""
    from jobs.stages.common import run_guarded

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    return run_guarded(Stage.train.value, lambda: _train(args, argv))


def _train(args: argparse.Namespace, argv: list[str]) -> int:
    """This process's part: the node's launcher (it starts the ranks) or a rank."""
    from jobs.stages.common import InputError, StageError, load_spec_and_name

    settings = Settings.from_env(os.environ)  # training's own entry point (its ranks run it too)
    try:
        spec, name = load_spec_and_name(args.spec, args.run, settings)
        if args.variant not in trained_variants(spec):
            field = {"clm": "clmBaseline", "self": "selfDistillBaseline", "sources": "sourcesOnlyBaseline"}
            raise InputError(
                f"--variant {args.variant}: the spec does not train it; set "
                f"training.{field[args.variant]}: true"
            )
        envs = rank_envs(dict(os.environ), spec.training.procs_per_node, spec.training.nodes)
        if envs is not None and len(envs) > 1:
            return launch_ranks(argv, envs)
        if envs is not None:
            os.environ.update(envs[0])
        return run_rank(spec, name, args.variant, settings, args.force)
    except SpecError:
        raise
    except ValueError as err:  # the launcher's environment; a training config or data fusion cannot use
        raise StageError(str(err)) from None


def run_rank(spec: Any, run_name: str, variant: str, settings: Settings, force: bool = False) -> int:
    """This process's rank of the training task: train (resuming), export, and on rank 0 the manifest."""
    from jobs.stages.common import complete_task

    job = TrainJob.open(spec, run_name, variant, settings, force)

    def work(reason: str | None, inputs: dict[str, str]) -> dict[str, Any] | int:
        started = time.time()
        done = job.train(reason, inputs)
        if done.outputs is None:
            return done.exit_code
        return build_manifest(
            spec,
            job.task,
            outputs=done.outputs,
            inputs=inputs,
            started_at=started,
            counts=done.counts,
            summary=done.summary,
        )

    code = complete_task(job.store, spec, job.dag, job.task, force, work, writer=job.rank == 0)
    if code == 0 and job.published and "FUSIONRUN_WORK_DIR" not in os.environ:
        # Our own scratch (local checkpoints, the export: hundreds of MB to GB) is now all in the store.
        # A folder the caller named is theirs to keep.
        shutil.rmtree(job.work, ignore_errors=True)
    return code


@dataclass
class Trained:
    """What training hands to the completeness rule: outputs None = no manifest (preempted, or not rank 0)."""

    exit_code: int
    outputs: dict[str, Any] | None = None  # store key -> jobs.complete.Output
    counts: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainJob:
    """One rank's view of the train task: where it reads and writes, and how it trains."""

    spec: Any
    run_name: str
    variant: str
    force: bool
    store: Any
    dag: list[Any]
    task: Any
    rank: int
    work: Path
    published: bool = False  # rank 0 uploaded the model (the manifest may be written)

    @classmethod
    def open(cls, spec: Any, run_name: str, variant: str, settings: Settings, force: bool) -> TrainJob:

        store = open_store(spec.store, run_name, settings, check=spec.store.is_s3)
        dag = build_dag(spec)
        task = {t.id: t for t in dag}[Task(Stage.train, variant=variant).id]
        rank = int(os.environ["RANK"])
        return cls(
            spec, run_name, variant, force, store, dag, task, rank, _work_dir(store, run_name, task.id)
        )

    def train(self, reason: str | None, inputs: dict[str, str]) -> Trained:
        """Train (resuming), then on rank 0 upload the model and summarise it; a preempted run publishes
        nothing."""
        from fusion.train.loop import exit_code, train
        from jobs.stages.common import StageContext, log_event

        ctx = StageContext(self.spec, self.run_name, self.store, self.task, self.dag, self.work / "scratch")
        cfg = train_config(self.spec, self.variant)
        model, tok, loss, blocks = _model_and_data(ctx, cfg)
        io = _train_io(
            self.work, self.store, self.variant, checkpoint_fingerprint(self.spec, self.task, inputs)
        )
        log_event(
            "start", task=self.task.id, rank=self.rank, reason=reason or "forced", blocks=blocks.n_blocks
        )
        # --force on a complete task retrains from scratch (its checkpoints would otherwise resume at the end)
        fresh = self.force and reason is None
        reporter = StoreRecorder(self.store, self.variant)
        result = train(cfg, model, blocks, io, tokenizer=tok, fresh=fresh, reporter=reporter, loss=loss)
        if result.preempted or self.rank != 0:
            return Trained(exit_code(result))
        outputs = publish_model(self.store, self.variant, result.export_dir)
        self.published = True
        return Trained(
            0, outputs, {"steps": result.steps_done, "blocks": blocks.n_blocks}, train_summary(result)
        )


def _work_dir(store: Any, run_name: str, task_id: str) -> Path:
    """FUSIONRUN_WORK_DIR, else a temp folder keyed by the store too: runs of the same name in other
    namespaces or stores must not share scratch."""
    where = hashlib.sha256(store.base_uri.encode()).hexdigest()[:12]
    default = Path(tempfile.gettempdir()) / f"fusionrun-{run_name}-{task_id}-{where}"
    return Path(os.environ.get("FUSIONRUN_WORK_DIR") or default)


def _train_io(work: Path, store: Any, variant: str, fingerprint: str) -> Any:
    from fusion.train.loop import TrainIO

    return TrainIO(work, store, store_checkpoints=Layout.checkpoints(variant), fingerprint=fingerprint)


def checkpoint_fingerprint(spec: Any, task: Any, inputs: dict[str, str]) -> str:
    """Checkpoints are only resumed by a run with the same training settings and the same inputs."""

    fp = fingerprint(spec, task) + ":" + ",".join(f"{k}={v}" for k, v in sorted(inputs.items()))
    return hashlib.sha256(fp.encode()).hexdigest()


def fused_shards(ctx: Any) -> list[Any]:
    """The fuse shards this variant trains on (its fuse variant's: clm reads FuseLLM's), with the sha256
    their manifests recorded (checked when opened)."""
    from fusion.train.data import ShardSource
    from jobs.stages.common import StageError

    shards = []
    for producer in ctx.dependencies(Stage.fuse):
        m = read_manifest(ctx.store, producer)
        key = Layout.shard(producer)
        if m is None or key not in m["outputs"]:
            raise StageError(f"input {ctx.store.uri_for(key)} has no manifest entry: run {producer.id} first")
        shards.append(ShardSource(ctx.input_file(key), m["outputs"][key]["sha256"]))
    return shards


def _model_and_data(ctx: Any, cfg: TrainConfig) -> tuple[Any, Any, Any, Any]:
    """The target model and tokenizer, the variant's loss, and the blocks it trains on (with the fused
    targets only when the loss uses them)."""
    from fusion.train.data import FusedBlocks
    from fusion.train.losses import make_loss
    from jobs.stages.common import load_model_tokenizer

    shards = fused_shards(ctx)
    tok, _ = load_model_tokenizer(ctx, ctx.spec.target.name)
    model = _load_target(ctx, len(tok), tok.eos_token_id)
    loss = make_loss(cfg)
    pad = tok.eos_token_id or 0
    blocks = FusedBlocks(shards, cfg.seq_len, cfg.seed, with_targets=loss.uses_targets, pad_id=pad)
    return model, tok, loss, blocks


def publish_model(store: Any, variant: str, export_dir: Path) -> dict[str, Any]:
    """Upload the exported HF folder to the variant's model prefix (Layout); returns the manifest outputs."""
    from fusion.format import sha256_file

    outputs: dict[str, Output] = {}
    for f in sorted(export_dir.rglob("*")):
        if f.is_file():
            key = Layout.model_prefix(variant) + f.relative_to(export_dir).as_posix()
            store.upload(f, key)
            outputs[key] = Output(sha256_file(f), f.stat().st_size)
    return outputs


def train_summary(result: Any) -> dict[str, Any]:
    last = result.last
    return {
        "steps": result.steps_done,
        "total_steps": result.total_steps,
        "resumed_from": result.resumed_from,
        "final_loss": last.loss if last else None,
        "final_clm_loss": last.clm_loss if last else None,
        "final_fusion_loss": last.fusion_loss if last else None,
        "weights_sha256": result.weights_digest,
    }


def _load_target(ctx: Any, vocab_size: int, eos_id: int | None) -> Any:
    """The target model on the CPU in its training dtype (DeepSpeed moves it to the rank's device), by the
    stages' one loader (common.load_spec_model: a target that will not load is bad input, as in extract)."""
    import torch

    from jobs.stages.common import load_spec_model

    on_gpu = torch.cuda.is_available()
    bf16 = use_bf16(ctx.spec.training.dtype, on_gpu, on_gpu and torch.cuda.is_bf16_supported())
    return load_spec_model(
        ctx,
        ctx.spec.target.name,
        vocab_size=vocab_size,
        eos_id=eos_id,
        device="cpu",
        dtype="bfloat16" if bf16 else "float32",
    )
