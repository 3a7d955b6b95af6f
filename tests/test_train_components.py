"""The trainer's components on their own, in this process with a real one-rank gloo group and real
DeepSpeed engines (tiny random-init Llama): the step, the checkpoint manager (save / resume / prune /
foreign fingerprint, with real files in a file store), the preemption flag and the throughput meter.
The two-rank runs of the whole trainer are in test_train_distributed.py."""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fusion.train import checkpoint as ck
from fusion.train.checkpoint_manager import STATE_FILE, CheckpointManager, PreemptionFlag
from fusion.train.config import TrainConfig
from fusion.train.data import DataState, FusedBlocks, ShardSource
from fusion.train.engine import DistContext, TrainSetup, build_engine, close_distributed, init_distributed
from fusion.train.losses import ClmLoss, FusionLoss
from fusion.train.reporting import Throughput
from fusion.train.step import train_step
from jobs.store import LocalStore
from tests.test_train_data import tiny_shard  # noqa: F401  (fixture)

PREFIX = "train/fused/checkpoints"
LR = 1e-2


@pytest.fixture(scope="module")
def dist() -> Iterator[DistContext]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield init_distributed()
    finally:
        close_distributed()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_engine(dist: DistContext, seed: int = 0, zero_stage: int = 2) -> TrainSetup:
    from fusion.models import random_init_model

    # vocabulary 256 covers the tiny shard's fused target ids (100..207)
    model = random_init_model("llama", vocab_size=256, hidden_size=16, num_layers=1, num_heads=2, seed=seed)
    cfg = TrainConfig(
        learning_rate=LR,
        warmup_ratio=0.0,
        max_steps=10,
        micro_batch_size=1,
        grad_accum=2,
        seq_len=4,
        zero_stage=zero_stage,
        dtype="float32",
    )
    return build_engine(cfg, model, n_blocks=2, dist=dist)


def weights(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def manager(setup: TrainSetup, dist: DistContext, tmp: Path, fingerprint: str = "fp", keep: int = 2):
    store = LocalStore(tmp / "store")
    root = tmp / "work" / "checkpoints"
    return CheckpointManager(setup.engine, dist, root, store, PREFIX, fingerprint, keep, {"total_steps": 10})


# ------------------------------------------------------------------------------------------------
# the step


def test_step_accumulates_micro_batches_sums_the_figures_and_updates_once(dist, tiny_shard):  # noqa: F811
    setup = make_engine(dist)
    fb = FusedBlocks([ShardSource(tiny_shard)], seq_len=4, seed=0)
    loss = FusionLoss(0.5)
    b1, after1 = fb.next_batch(DataState(), 1, 0, 1)
    b2, after2 = fb.next_batch(after1, 1, 0, 1)
    with torch.no_grad():  # both micro-batches see the weights before the update
        parts = [
            loss(setup.engine.module(input_ids=t["input_ids"]).logits, t)
            for t in (b1.torch("cpu"), b2.torch("cpu"))
        ]
    before = weights(setup.engine)

    out = train_step(setup.engine, setup.optimizer, fb, DataState(), loss, 2, 1, dist, stop_requested=True)
    assert out.sums[0] == pytest.approx(sum(p.total.item() for p in parts), rel=1e-6)
    assert out.sums[1] == pytest.approx(sum(p.clm.item() for p in parts), rel=1e-6)
    assert out.sums[2] == pytest.approx(sum(p.fusion.item() for p in parts), rel=1e-6)
    assert out.sums[3] == 8  # two blocks of 4 real tokens
    assert out.stop is True and out.learning_rate == pytest.approx(LR)  # no warmup: the full rate at once
    assert out.data == after2 == DataState(1, 0)  # both blocks consumed: the next epoch
    assert out.block_ids == [int(b1.block_ids[0]), int(b2.block_ids[0])]
    assert setup.engine.global_steps == 1  # one optimizer update for the two micro-batches
    assert any(not torch.equal(before[k], v) for k, v in weights(setup.engine).items())


def test_clm_step_runs_on_blocks_without_targets(dist, tiny_shard):  # noqa: F811
    setup = make_engine(dist)
    fb = FusedBlocks([ShardSource(tiny_shard)], seq_len=4, seed=0, with_targets=False)
    out = train_step(
        setup.engine, setup.optimizer, fb, DataState(), ClmLoss(), 2, 1, dist, stop_requested=False
    )
    assert out.sums[2] == 0.0 and out.sums[0] == out.sums[1] > 0 and out.stop is False


# ------------------------------------------------------------------------------------------------
# the checkpoint manager


def test_save_uploads_runs_the_hook_before_any_marker_and_prunes(dist, tmp_path):
    setup = make_engine(dist)
    m = manager(setup, dist, tmp_path)
    seen = []

    def hook(step: int) -> None:  # what exists when the history would be flushed
        d = m.local_root / ck.tag(step)
        seen.append(
            (
                step,
                m.store.exists(f"{PREFIX}/{ck.tag(step)}/{STATE_FILE}"),
                (d / ck.MARKER).exists(),
                m.store.exists(f"{PREFIX}/{ck.tag(step)}/{ck.MARKER}"),
            )
        )

    for s in (1, 2, 3):
        n_files = m.save(s, DataState(0, 2 * s), before_marker=lambda s=s: hook(s))
    assert seen == [(s, True, False, False) for s in (1, 2, 3)]  # uploaded, no marker yet
    assert ck.local_steps(m.local_root, "fp") == [2, 3] and ck.store_steps(m.store, PREFIX, "fp") == [2, 3]
    assert not m.store.list(f"{PREFIX}/step-1/") and not (m.local_root / "step-1").exists()
    marker = json.loads(m.store.get_bytes(f"{PREFIX}/step-3/{ck.MARKER}"))
    assert (marker["step"], marker["fingerprint"], marker["world_size"], marker["zero_stage"]) == (
        3,
        "fp",
        1,
        2,
    )
    assert {STATE_FILE, "rng-rank0.pt"} <= set(marker["files"]) and len(marker["files"]) == n_files
    assert any(f.endswith("model_states.pt") for f in marker["files"])
    state = json.loads((m.local_root / "step-3" / STATE_FILE).read_text())
    assert state == {"step": 3, "data": {"epoch": 0, "index": 6}, "total_steps": 10}


def test_resume_restores_weights_data_and_rng_from_disk_or_from_the_store_alone(dist, tiny_shard, tmp_path):  # noqa: F811
    import shutil

    setup = make_engine(dist)
    fb = FusedBlocks([ShardSource(tiny_shard)], seq_len=4, seed=0)
    out = train_step(setup.engine, setup.optimizer, fb, DataState(), FusionLoss(0.9), 2, 1, dist, False)
    manager(setup, dist, tmp_path).save(1, out.data)
    saved, draw = weights(setup.engine), torch.rand(3)  # the RNG was saved just before this draw
    train_step(setup.engine, setup.optimizer, fb, out.data, FusionLoss(0.9), 2, 1, dist, False)
    assert any(not torch.equal(saved[k], v) for k, v in weights(setup.engine).items())

    for local in (True, False):
        if not local:  # a new node with an empty disk
            shutil.rmtree(tmp_path / "work")
        fresh_setup = make_engine(dist, seed=5)  # other initial weights
        point = manager(fresh_setup, dist, tmp_path).resume()
        assert point is not None and point.step == 1 and point.data == out.data == DataState(1, 0)
        assert point.folder == tmp_path / "work" / "checkpoints" / "step-1"
        for k, v in weights(fresh_setup.engine).items():
            assert torch.equal(v, saved[k]), k
        assert torch.equal(torch.rand(3), draw)
        assert fresh_setup.engine.global_steps == 1


def test_checkpoints_of_another_fingerprint_are_deleted_not_resumed(dist, tmp_path):
    setup = make_engine(dist)
    manager(setup, dist, tmp_path, fingerprint="old-settings").save(4, DataState(0, 8))
    m = manager(setup, dist, tmp_path, fingerprint="new-settings")
    assert m.resume() is None
    assert ck.local_steps(m.local_root) == [] and ck.store_steps(m.store, PREFIX) == []


def test_fresh_deletes_every_checkpoint_first(dist, tmp_path):
    setup = make_engine(dist)
    m = manager(setup, dist, tmp_path)
    m.save(2, DataState(0, 4))
    assert m.resume(fresh=True) is None
    assert not m.local_root.exists() and m.store.list(f"{PREFIX}/") == []


def test_keep_must_be_positive(dist, tmp_path):
    with pytest.raises(ValueError, match="keep_checkpoints must be >= 1, got 0"):
        CheckpointManager(None, dist, tmp_path, None, PREFIX, None, keep=0)


# ------------------------------------------------------------------------------------------------
# preemption flag and throughput


def test_sigterm_only_sets_the_flag():
    previous = signal.getsignal(signal.SIGTERM)
    try:
        flag = PreemptionFlag().install()
        assert flag.requested is False
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.requested is True  # and the process is still here
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_throughput_figures_by_hand():
    times = iter([100.0, 102.0, 104.0])  # attempt start, step start, step end
    meter = Throughput(start_step=4, total_steps=10, clock=lambda: next(times))
    meter.begin_step()
    m = meter.metrics(5, (6.0, 5.0, 1.0, 64.0), n_micro=4, learning_rate=0.01, has_fusion=True, epoch=1)
    assert (m.loss, m.clm_loss, m.fusion_loss, m.tokens) == (1.5, 1.25, 0.25, 64)
    assert m.step_seconds == 2.0 and m.tokens_per_second == 32.0
    assert m.eta_seconds == 20.0  # 1 step in 4 s since the attempt began, 5 steps left
    rec = m.log_record()
    assert rec["event"] == "step" and rec["lr"] == 0.01 and rec["tokens_per_s"] == 32.0 and rec["epoch"] == 1
    times = iter([0.0, 0.0, 1.0])
    meter = Throughput(0, 10, clock=lambda: next(times))
    meter.begin_step()
    assert meter.metrics(1, (2.0, 2.0, 0.0, 8.0), 1, None, has_fusion=False, epoch=0).fusion_loss is None


def test_the_loop_trains_each_step_with_the_loss_of_that_step(dist, tiny_shard, tmp_path):  # noqa: F811
    """training.lambdaFinal: the loop asks the loss for each update's own (here 10 updates, lambda 0.5 ->
    1.0 in nine equal moves); the schedule's loss is what the step back-propagates."""
    from fusion.train.loop import Trainer, TrainIO

    seen = []

    class Scheduled(FusionLoss):
        def at(self, step: int, total_steps: int) -> FusionLoss:
            loss = super().at(step, total_steps)
            seen.append((step, round(loss.lam, 6)))
            return loss

    setup = make_engine(dist)
    fb = FusedBlocks([ShardSource(tiny_shard)], seq_len=4, seed=0)
    cfg = TrainConfig(max_steps=10, micro_batch_size=1, grad_accum=2, seq_len=4, checkpoint_interval=1000)
    trainer = Trainer(cfg, None, fb, TrainIO(tmp_path), loss=Scheduled(0.5, lam_final=1.0))
    result = trainer._train(setup, dist, manager(setup, dist, tmp_path), None, PreemptionFlag())
    assert result.steps_done == 10
    assert seen == [(s, round(0.5 + 0.5 * s / 9, 6)) for s in range(10)]
