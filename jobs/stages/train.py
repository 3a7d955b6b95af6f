"""The `train` stage: continual training of the target on the fused shards (or the CLM-only baseline).

    python -m jobs train [--variant fused|clm] [--spec FILE] [--run NAME] [--force]

Process layout (no ssh, no MPI):
- RANK set (torchrun, or one pod per rank as the operator starts them): this process is that rank.
- no RANK, procs_per_node > 1 (NPROC_PER_NODE or the spec): this process is a node's launcher; it starts
  procs_per_node ranks with RANK = NODE_RANK * procs_per_node + i, LOCAL_RANK = i, waits, and exits with
  the ranks' verdict. One failed rank stops the others (the group restarts from the last checkpoint).
- nothing set: one local process, RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 and a free port.

Every rank trains; rank 0 alone uploads the exported model to `train/<variant>/model/` and writes the task
manifest last. Exit codes: 0 done (or already complete), 1 failed, 75 preempted (SIGTERM: checkpoint saved,
rerun to continue).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fusion.train.config import TrainConfig
from jobs.registry import Variant

EXIT_PREEMPTED = 75  # = fusion.train.loop.EXIT_PREEMPTED (kept here so the launcher needs no torch import)


def train_config(spec: Any, variant: str) -> TrainConfig:
    """The typed training config of a FusionRun spec (`spec.training`) for one variant."""
    t = spec.training
    return TrainConfig(
        variant=variant,
        lam=t.lambda_,
        loss_kind=t.loss,
        learning_rate=t.learning_rate,
        schedule=t.schedule,
        warmup_ratio=t.warmup_ratio,
        min_lr_ratio=t.min_lr_ratio,
        weight_decay=t.weight_decay,
        betas=tuple(t.betas),
        grad_clip=t.grad_clip,
        max_steps=t.max_steps,
        epochs=t.epochs,
        micro_batch_size=t.micro_batch_size,
        grad_accum=t.grad_accum,
        seq_len=t.seq_len,
        zero_stage=t.zero_stage,
        gradient_checkpointing=t.gradient_checkpointing,
        checkpoint_interval=t.checkpoint_interval,
        seed=t.seed,
        dtype=t.dtype,
    )


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
        subprocess.Popen([sys.executable, "-m", "jobs", "train", *argv], env={**os.environ, **e})
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
# the stage


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m jobs train")
    ap.add_argument("--variant", choices=[v.value for v in Variant], default="fused")
    ap.add_argument("--spec")
    ap.add_argument("--run")
    ap.add_argument("--force", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from jobs.complete import ManifestError
    from jobs.plan import trained_variants
    from jobs.spec import SpecError
    from jobs.stages.common import InputError, StageError, exit_code_for, load_spec_and_name, log_event
    from jobs.store import StoreError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        spec, name = load_spec_and_name(args.spec, args.run)
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
        return run_rank(spec, name, args.variant, args.force)
    except (SpecError, StageError, StoreError, ManifestError, ValueError) as err:
        from jobs.retry import write_termination_message

        log_event("failed", task=f"train-{args.variant}", error=str(err))
        print(f"error: {err}", file=sys.stderr)
        write_termination_message(f"train: {err}")
        return exit_code_for(err)


def run_rank(spec: Any, run_name: str, variant: str, force: bool = False) -> int:
    """This process's rank of the training task: train (resuming), export, and on rank 0 the manifest."""
    from fusion.train.data import FusedBlocks, ShardSource
    from fusion.train.loop import TrainIO, exit_code, train
    from jobs.complete import (
        Output,
        Policy,
        build_manifest,
        fingerprint,
        input_digests,
        invalidate,
        read_manifest,
        why_incomplete,
        write_manifest,
    )
    from jobs.plan import build_dag
    from jobs.registry import Layout, Stage, Task
    from jobs.stages.common import (
        StageContext,
        StageError,
        load_model_tokenizer,
        log_event,
        record_spec,
    )
    from jobs.store import open_store

    rank = int(os.environ["RANK"])
    store = open_store(spec.store, run_name, check=spec.store.is_s3)
    dag = build_dag(spec)
    by_id = {t.id: t for t in dag}
    task = by_id[Task(Stage.train, variant=variant).id]
    reason = why_incomplete(store, spec, task, by_id, Policy.for_store(store))
    if reason is None and not force:
        log_event("skip", task=task.id, reason="complete")
        return 0
    inputs = input_digests(store, by_id, task)
    if rank == 0 and reason != "no manifest":
        invalidate(store, task)  # a stale manifest must not vouch for a model being rewritten
    if rank == 0:
        record_spec(store, spec)
    started = time.time()
    # Keyed by the store too: runs of the same name in other namespaces or stores must not share scratch.
    where = hashlib.sha256(store.base_uri.encode()).hexdigest()[:12]
    work = Path(
        os.environ.get("FUSIONRUN_WORK_DIR")
        or Path(tempfile.gettempdir()) / f"fusionrun-{run_name}-{task.id}-{where}"
    )
    ctx = StageContext(spec, run_name, store, task, dag, work / "scratch")

    shards = []
    for producer in ctx.dependencies(Stage.fuse):
        m = read_manifest(store, producer)
        key = Layout.shard(producer)
        if m is None or key not in m["outputs"]:
            raise StageError(f"input {store.uri_for(key)} has no manifest entry: run {producer.id} first")
        shards.append(ShardSource(ctx.input_file(key), m["outputs"][key]["sha256"]))

    cfg = train_config(spec, "clm" if variant == "clm" else "fused")  # self / sources: other teachers
    tok, _ = load_model_tokenizer(ctx, spec.target.name)
    model = _load_target(ctx, len(tok), tok.eos_token_id)
    blocks = FusedBlocks(
        shards, cfg.seq_len, cfg.seed, with_targets=variant != "clm", pad_id=tok.eos_token_id or 0
    )
    # Checkpoints are only resumed by a run with the same training settings and the same inputs.
    fp = fingerprint(spec, task) + ":" + ",".join(f"{k}={v}" for k, v in sorted(inputs.items()))
    io = TrainIO(
        work, store, prefix=Layout.train_prefix(variant), fingerprint=hashlib.sha256(fp.encode()).hexdigest()
    )
    log_event("start", task=task.id, rank=rank, reason=reason or "forced", blocks=blocks.n_blocks)
    # --force on a complete task retrains from scratch (its checkpoints would otherwise resume at the end)
    result = train(cfg, model, blocks, io, tokenizer=tok, fresh=force and reason is None)
    if result.preempted or rank != 0:
        return exit_code(result)

    from fusion.format import sha256_file

    outputs: dict[str, Output] = {}
    for f in sorted(result.export_dir.rglob("*")):
        if f.is_file():
            key = Layout.model_prefix(variant) + f.relative_to(result.export_dir).as_posix()
            store.upload(f, key)
            outputs[key] = Output(sha256_file(f), f.stat().st_size)
    last = result.history[-1] if result.history else {}
    summary = {
        "steps": result.steps_done,
        "total_steps": result.total_steps,
        "resumed_from": result.resumed_from,
        "final_loss": last.get("loss"),
        "final_clm_loss": last.get("clm_loss"),
        "final_fusion_loss": last.get("fusion_loss"),
        "weights_sha256": result.weights_digest,
    }
    counts = {"steps": result.steps_done, "blocks": blocks.n_blocks}
    write_manifest(store, task, build_manifest(spec, task, outputs, inputs, started, counts, summary))
    log_event("done", task=task.id, seconds=round(time.time() - started, 2), **counts)
    if "FUSIONRUN_WORK_DIR" not in os.environ:
        # Our own scratch (local checkpoints, the export: hundreds of MB to GB) is now all in the store.
        # A folder the caller named is theirs to keep.
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _load_target(ctx: Any, vocab_size: int, eos_id: int | None) -> Any:
    """The target model on the CPU in its training dtype (DeepSpeed moves it to the rank's device)."""
    import torch

    from fusion.models import load_model
    from fusion.train.config import use_bf16
    from jobs.stages.common import InputError, model_location

    m = ctx.spec.target
    on_gpu = torch.cuda.is_available()
    bf16 = use_bf16(ctx.spec.training.dtype, on_gpu, on_gpu and torch.cuda.is_bf16_supported())
    ri = m.random_init.model_dump() if m.random_init is not None else None
    path = None if ri is not None else model_location(ctx, m.uri)
    try:
        return load_model(
            path,
            m.gguf_file if ri is None else None,
            random_init=ri,
            vocab_size=vocab_size,
            device="cpu",
            dtype="bfloat16" if bf16 else "float32",
            eos_token_id=eos_id,
        )
    except Exception as err:
        raise InputError(
            f"target {m.name} ({m.uri or 'randomInit'}) will not load: {err}. Fix uri/ggufFile/"
            f"randomInit of the target in the spec"
        ) from None
