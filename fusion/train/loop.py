"""The trainer: components put together. Setup (fusion.train.engine), the checkpoint manager
(fusion.train.checkpoint_manager), the step (fusion.train.step), the variant's loss (fusion.train.losses),
and a reporter (fusion.train.reporting) that the caller injects to receive every step's metrics.

Each optimizer step: grad_accum micro-batches per rank with the variant's loss, then one all-reduce of the
loss parts, token count and stop flag. Checkpoints every checkpoint_interval steps, and when SIGTERM asks us
to stop: then the current step finishes, the checkpoint is saved and the process exits with EXIT_PREEMPTED,
distinct from success and from failures. At the end the full weights are fingerprinted on every rank and
exported as a Hugging Face folder on rank 0.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusion.train import checkpoint as ckpt
from fusion.train.checkpoint_manager import CheckpointManager, PreemptionFlag, ResumePoint
from fusion.train.config import TrainConfig
from fusion.train.data import DataState, FusedBlocks
from fusion.train.engine import (
    REQUIRED_ENV,
    DistContext,
    TrainSetup,
    build_engine,
    check_dist_env,
    checkpointing_on,
    close_distributed,
    init_distributed,
    seed_everything,
)
from fusion.train.export import export_hf, weights_digest
from fusion.train.losses import TrainLoss, make_loss
from fusion.train.reporting import NullReporter, StepMetrics, Throughput, TrainReporter
from fusion.train.step import StepResult, train_step

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "stopped on request, checkpoint saved, run me again"

# REQUIRED_ENV and check_dist_env moved to fusion.train.engine; still importable from here
__all__ = [
    "EXIT_PREEMPTED",
    "REQUIRED_ENV",
    "TrainIO",
    "TrainResult",
    "Trainer",
    "check_dist_env",
    "exit_code",
    "train",
]


@dataclass
class TrainIO:
    """Where a run reads and writes: a local work folder, and optionally the artifact store + the key prefix
    of its checkpoints there (the caller's layout: jobs.registry.Layout.checkpoints); how many to keep."""

    work_dir: Path
    store: ckpt.ArtifactStore | None = None
    store_checkpoints: str = "checkpoints"
    fingerprint: str | None = None  # what the run trains on and how; checkpoints of another are ignored
    keep_checkpoints: int = 2

    @property
    def local_checkpoints(self) -> Path:
        return self.work_dir / "checkpoints"


@dataclass
class TrainResult:
    steps_done: int
    total_steps: int
    preempted: bool
    resumed_from: int | None
    weights_digest: str | None = None
    export_dir: Path | None = None
    last: StepMetrics | None = None  # the last step's metrics (None when no step ran in this attempt)


def _log(record: dict[str, Any]) -> None:
    print(json.dumps(record, sort_keys=True), flush=True)


class Trainer:
    """Trains `model` on `blocks` with DeepSpeed, resuming from the newest complete checkpoint if any.

    Every rank builds one and calls run(). trace_blocks adds each rank's block ids to a per-rank step log
    (tests use it to check that a resumed run sees every block exactly once)."""

    def __init__(
        self,
        cfg: TrainConfig,
        model: Any,
        blocks: FusedBlocks,
        io: TrainIO,
        tokenizer: Any = None,
        loss: TrainLoss | None = None,
        reporter: TrainReporter | None = None,
        log: Callable[[dict[str, Any]], None] = _log,
        trace_blocks: bool = False,
    ) -> None:
        self.cfg, self.model, self.blocks, self.io, self.tokenizer = cfg, model, blocks, io, tokenizer
        self.loss = loss if loss is not None else make_loss(cfg)
        if self.loss.uses_targets and not blocks.with_targets:
            raise ValueError(
                f"the {cfg.variant} loss needs fused targets: build FusedBlocks with_targets=True"
            )
        self.reporter = reporter if reporter is not None else NullReporter()
        self.log, self.trace_blocks = log, trace_blocks

    def run(self, export: bool = True, fresh: bool = False) -> TrainResult:
        """Train to the end (then fingerprint and export) or until SIGTERM (preempted=True: exit with
        EXIT_PREEMPTED). fresh: delete every checkpoint first and start from step 0 (a forced rerun)."""
        stop = PreemptionFlag().install()
        dist = init_distributed()
        try:
            seed_everything(self.cfg.seed + dist.rank)
            setup = build_engine(self.cfg, self.model, self.blocks.n_blocks, dist)
            self._log_start(setup, dist)
            ckpts = self._checkpoints(setup, dist)
            resumed = ckpts.resume(fresh)
            if resumed is not None and dist.is_main:
                self.log(self._resumed_record(resumed))
            result = self._train(setup, dist, ckpts, resumed, stop)
            if not result.preempted:
                self._finish(setup, dist, result, export)
            return result
        finally:
            close_distributed()

    def _checkpoints(self, setup: TrainSetup, dist: DistContext) -> CheckpointManager:
        run_info = {"total_steps": setup.total_steps, "world_size": dist.world, "config": self.cfg.to_json()}
        io = self.io
        return CheckpointManager(
            setup.engine,
            dist,
            io.local_checkpoints,
            io.store,
            io.store_checkpoints,
            io.fingerprint,
            io.keep_checkpoints,
            run_info,
        )

    def _train(
        self,
        setup: TrainSetup,
        dist: DistContext,
        ckpts: CheckpointManager,
        resumed: ResumePoint | None,
        stop: PreemptionFlag,
    ) -> TrainResult:
        """The step loop from the resume point: step, report, checkpoint on schedule or on SIGTERM."""
        step, data = (resumed.step, resumed.data) if resumed else (0, DataState())
        total = setup.total_steps
        if dist.is_main:
            self.reporter.attempt_started(step, total, dist.world)
        meter = Throughput(step, total)
        result = TrainResult(step, total, False, resumed.step if resumed else None)
        n_micro = self.cfg.grad_accum * dist.world
        while step < total:
            meter.begin_step()
            out = self._step(setup, dist, data, stop, self.loss.at(step, total))
            step, data = step + 1, out.data
            metrics = meter.metrics(
                step, out.sums, n_micro, out.learning_rate, self.loss.uses_targets, data.epoch
            )
            self._report(metrics, out.block_ids, dist)
            result.steps_done, result.last = step, metrics
            if out.stop or step % self.cfg.checkpoint_interval == 0:
                self._save(ckpts, step, data, dist)
            if out.stop:
                result.preempted = step < total
                break
        if dist.is_main:
            self.reporter.finished(result.last, "preempted" if result.preempted else "finished")
            if result.preempted:
                self.log({"event": "preempted", "step": step, "exit_code": EXIT_PREEMPTED})
        return result

    def _step(
        self, setup: TrainSetup, dist: DistContext, data: DataState, stop: PreemptionFlag, loss: TrainLoss
    ) -> StepResult:
        cfg = self.cfg
        return train_step(
            setup.engine,
            setup.optimizer,
            self.blocks,
            data,
            loss,
            cfg.grad_accum,
            cfg.micro_batch_size,
            dist,
            stop_requested=stop.requested,
        )

    def _report(self, metrics: StepMetrics, block_ids: list[int], dist: DistContext) -> None:
        rec = metrics.log_record()
        if self.trace_blocks:
            self.log({**rec, "event": "step_rank", "rank": dist.rank, "blocks": block_ids})
        if dist.is_main:
            self.log(rec)
            self.reporter.step(metrics)

    def _save(self, ckpts: CheckpointManager, step: int, data: DataState, dist: DistContext) -> None:
        n_files = ckpts.save(step, data, before_marker=lambda: self.reporter.checkpoint(step))
        if dist.is_main:
            folder = ckpts.local_root / ckpt.tag(step)
            self.log({"event": "checkpoint", "step": step, "dir": str(folder), "files": n_files})

    def _finish(self, setup: TrainSetup, dist: DistContext, result: TrainResult, export: bool) -> None:
        """Fingerprint the full weights (every rank) and export the HF folder (rank 0 writes it)."""
        result.weights_digest = weights_digest(setup.engine)
        if export:
            result.export_dir = export_hf(setup.engine, self.tokenizer, self.io.work_dir / "model")
        self.log(
            {
                "event": "done",
                "rank": dist.rank,
                "step": result.steps_done,
                "weights_sha256": result.weights_digest,
            }
        )

    def _log_start(self, setup: TrainSetup, dist: DistContext) -> None:
        if not dist.is_main:
            return
        self.log(
            {
                "event": "start",
                "world_size": dist.world,
                "zero_stage": self.cfg.zero_stage,
                "bf16": setup.bf16,
                "total_steps": setup.total_steps,
                "blocks": self.blocks.n_blocks,
                "variant": self.cfg.variant,
                "lambda": self.cfg.effective_lambda,
                "gradient_checkpointing": checkpointing_on(setup.engine.module),
                "device": str(setup.engine.device),
            }
        )

    @staticmethod
    def _resumed_record(r: ResumePoint) -> dict[str, Any]:
        return {"event": "resumed", "step": r.step, "data": r.data.to_json(), "from": str(r.folder)}


def train(
    cfg: TrainConfig,
    model: Any,
    blocks: FusedBlocks,
    io: TrainIO,
    tokenizer: Any = None,
    export: bool = True,
    trace_blocks: bool = False,
    fresh: bool = False,
    log: Callable[[dict[str, Any]], None] = _log,
    reporter: TrainReporter | None = None,
    loss: TrainLoss | None = None,
) -> TrainResult:
    """Trainer(...).run(...) in one call (every rank calls it); the loss defaults to the variant's."""
    trainer = Trainer(cfg, model, blocks, io, tokenizer, loss, reporter, log, trace_blocks)
    return trainer.run(export=export, fresh=fresh)


def exit_code(result: TrainResult) -> int:
    return EXIT_PREEMPTED if result.preempted else 0
