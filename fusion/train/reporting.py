"""What the trainer tells the outside world: step metrics, through an injected reporter.

fusion imports nothing of ours, so the trainer does not know where progress goes: the train stage
(jobs.stages.train) injects a reporter that turns StepMetrics into the store's progress record and
training history. Rank 0 alone calls the reporter (the figures are all-reduced: every rank has the same).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal, Protocol

EndState = Literal["finished", "preempted"]


@dataclass(frozen=True)
class StepMetrics:
    """One optimizer step, averaged over its micro-batches and all ranks."""

    step: int  # 1-based: optimizer updates done
    total_steps: int
    loss: float
    clm_loss: float
    fusion_loss: float | None  # None for a loss without a fusion term (CLM-only)
    learning_rate: float | None  # the rate this update used
    tokens: int  # real input tokens of the step, all ranks
    tokens_per_second: float
    step_seconds: float
    eta_seconds: float | None
    epoch: int  # data epoch after the step

    def log_record(self) -> dict[str, Any]:
        """The `"event": "step"` JSON log line (its keys are a file format: the report reads old logs)."""
        return {
            "event": "step",
            "step": self.step,
            "total_steps": self.total_steps,
            "loss": self.loss,
            "clm_loss": self.clm_loss,
            "fusion_loss": self.fusion_loss,
            "lr": self.learning_rate,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens_per_second,
            "step_s": self.step_seconds,
            "eta_seconds": self.eta_seconds,
            "epoch": self.epoch,
        }


class TrainReporter(Protocol):
    """Called on rank 0 only. An exception fails the run (as a failed checkpoint upload does)."""

    def attempt_started(self, start_step: int, total_steps: int, world_size: int) -> None:
        """Training (re)starts after `start_step` steps (0: from scratch): nothing logged after that step
        belongs to this run any more (it was not checkpointed)."""

    def step(self, metrics: StepMetrics) -> None:
        """Every optimizer step."""

    def checkpoint(self, step: int) -> None:
        """Checkpoint `step` is saved and about to be marked complete: persist what must survive a resume
        from it (called before the marker, so a resumable checkpoint never outruns the history)."""

    def finished(self, metrics: StepMetrics | None, state: EndState) -> None:
        """The last step ran: all steps done ("finished") or stopped by SIGTERM ("preempted")."""


class NullReporter:
    """Reports nothing (a run without a store; the JSON log lines still say everything)."""

    def attempt_started(self, start_step: int, total_steps: int, world_size: int) -> None:
        pass

    def step(self, metrics: StepMetrics) -> None:
        pass

    def checkpoint(self, step: int) -> None:
        pass

    def finished(self, metrics: StepMetrics | None, state: EndState) -> None:
        pass


class Throughput:
    """Step time, tokens per second and the remaining time, from wall-clock time since this attempt began."""

    def __init__(self, start_step: int, total_steps: int, clock: Any = time.time) -> None:
        self.clock, self.total = clock, total_steps
        self.t_start, self.start_step = clock(), start_step
        self.t_step = self.t_start

    def begin_step(self) -> None:
        self.t_step = self.clock()

    def metrics(
        self,
        step: int,
        sums: tuple[float, float, float, float],
        n_micro: int,
        learning_rate: float | None,
        has_fusion: bool,
        epoch: int,
    ) -> StepMetrics:
        """StepMetrics of `step` from the all-reduced sums (loss, clm, fusion, tokens) over n_micro
        micro-batches (grad_accum x world size)."""
        now = self.clock()
        dt = now - self.t_step
        rate = (step - self.start_step) / max(now - self.t_start, 1e-9)
        total, clm, fusion, tokens = sums
        return StepMetrics(
            step=step,
            total_steps=self.total,
            loss=total / n_micro,
            clm_loss=clm / n_micro,
            fusion_loss=fusion / n_micro if has_fusion else None,
            learning_rate=learning_rate,
            tokens=int(tokens),
            tokens_per_second=tokens / dt,
            step_seconds=dt,
            eta_seconds=(self.total - step) / rate if rate > 0 else None,
            epoch=epoch,
        )
