"""Training-step cost of the fused loss against a CLM-only step: same model, same batch, one run.

    .venv/bin/python -m bench.train_step [--vocab 32000] [--batch 4] [--seq 256] [--k 10] [--steps 10]

A step is forward + loss + backward + AdamW step on a tiny random-init Llama. Three losses:
  clm        torch.nn.functional.cross_entropy over the vocabulary (what a plain CLM trainer runs)
  clm-ours   fusion.train.losses.ClmLoss: the CLM-only baseline's loss (fp32 logsumexp + gather, no targets)
  fused      fusion.train.losses.FusionLoss(0.9): fusion.loss.fusion_loss with K sparse targets per position
Steps are interleaved round by round (bench.timing: clm, clm-ours, fused / clm-ours, fused, clm / ...); the
fused/clm ratio is the median over rounds of each round's ratio, with its spread (goal <= 1.15): one busy
moment inflates one round's ratio, not the figure. Every loss must stay finite (else exit 1). Peak memory
of a step: on a GPU torch.cuda.max_memory_allocated after a reset; on the CPU the peak RSS growth of a
step, measured in a fresh child process per loss (a process's peak RSS only ever rises).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
from typing import Any

from bench.timing import Timings, interleave, machine_load

LOSSES = ("clm", "clm-ours", "fused")


def build(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    import torch

    from fusion.models import random_init_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = (
        random_init_model(
            "llama",
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            num_layers=args.layers,
            num_heads=args.heads,
            seed=0,
        )
        .to(device=device, dtype=dtype)
        .train()
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    b, t, k, v = args.batch, args.seq, args.k, args.vocab
    input_ids = torch.randint(0, v, (b, t + 1), generator=g)
    target_ids = torch.randint(0, v, (b, t, k), generator=g)
    target_ids[..., 0] = input_ids[:, 1:]  # the gold token among the K, as real fused targets mostly have
    target_probs = torch.softmax(torch.randn(b, t, k, generator=g) * 2, dim=-1).half()
    batch = {
        "input_ids": input_ids[:, :-1],
        "labels": input_ids[:, 1:],
        "target_ids": target_ids,
        "target_probs": target_probs,
        "fusion_mask": torch.ones(b, t, dtype=torch.bool),
    }
    return model, opt, {k_: x.to(device) for k_, x in batch.items()}


def step(model: Any, opt: Any, batch: dict[str, Any], loss_name: str) -> float:
    import torch

    from fusion.train.losses import ClmLoss, FusionLoss

    logits = model(input_ids=batch["input_ids"]).logits
    if loss_name == "clm":
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), batch["labels"].reshape(-1)
        )
    else:  # the trainer's own loss objects: what the CLM-only baseline and FuseLLM train with
        loss = (ClmLoss() if loss_name == "clm-ours" else FusionLoss(0.9))(logits, batch).total
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_steps(args: argparse.Namespace) -> tuple[Timings, list[float]]:
    """Interleaved rounds of one step per loss (the warm-up round creates the allocator's pools, the
    kernels and the optimizer state); also every loss value, which must be finite."""
    model, opt, batch = build(args)
    losses: list[float] = []
    timings = interleave(
        {n: (lambda n=n: step(model, opt, batch, n)) for n in LOSSES},
        rounds=args.steps,
        sync=_sync,
        after=lambda _, loss: losses.append(loss),
    )
    return timings, losses


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(args: argparse.Namespace, loss_name: str) -> int:
    """Peak memory (bytes) one step of `loss_name` needs beyond the model, optimizer state and batch."""
    import torch

    model, opt, batch = build(args)
    step(model, opt, batch, loss_name)  # creates the optimizer state: not the loss's cost
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(model, opt, batch, loss_name)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # CPU: this child's peak RSS after one more step, minus its RSS before it
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    base = _rss_bytes()
    step(model, opt, batch, loss_name)
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, peak_before)
    return peak - base


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary (Mistral's size by default)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--k", type=int, default=10, help="fused targets per position")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--steps", type=int, default=11, help="timed rounds (one step of each loss per round)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--memory-child", choices=LOSSES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(peak_memory(args, args.memory_child))
        return 0

    timings, losses = time_steps(args)
    child = [sys.executable, "-m", "bench.train_step", *(argv if argv is not None else sys.argv[1:])]
    mem = {
        n: int(
            subprocess.run(
                [*child, "--memory-child", n], capture_output=True, text=True, check=True
            ).stdout.split()[-1]
        )
        for n in LOSSES
    }
    on_gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if on_gpu else f"cpu ({torch.get_num_threads()} threads)"
    print(
        f"train step, tiny Llama (hidden {args.hidden}, {args.layers} layers), vocab {args.vocab}, "
        f"batch {args.batch} x {args.seq} tokens, K = {args.k}, {device}; {timings.rounds} interleaved "
        f"rounds, {machine_load()}"
    )
    print(f"{'loss':<10} {'median step':>12} {'IQR of its steps':>20} {'peak mem of a step':>20}")
    for n in LOSSES:
        s = timings.summary(n)
        iqr = f"{s.q1 * 1e3:.1f}-{s.q3 * 1e3:.1f} ms"
        print(f"{n:<10} {s.median * 1e3:>9.1f} ms {iqr:>20} {mem[n] / 2**20:>16.1f} MiB")
    ratio, ours = timings.ratio("fused", "clm"), timings.ratio("fused", "clm-ours")
    print(
        f"fused / clm step time, median of per-round ratios: {ratio.fmt('x', 3)}: {ratio.against(1.15)} "
        "(<= 1.15x); "
        f"fused / clm-ours: {ours.fmt('x', 3)}; "
        f"peak memory fused / clm: {mem['fused'] / max(mem['clm'], 1):.3f}x"
    )
    bad = [x for x in losses if not math.isfinite(x)]
    if bad:
        print(f"FAILED: {len(bad)} of {len(losses)} step losses are not finite", file=sys.stderr)
    print(
        json.dumps(
            {
                "bench": "train_step",
                "device": device,
                "load": machine_load(),
                "vocab": args.vocab,
                "batch": args.batch,
                "seq": args.seq,
                "k": args.k,
                "median_s": {n: timings.median(n) for n in LOSSES},
                "seconds": timings.seconds,
                "peak_bytes": mem,
                "ratio": ratio.median,
                "ratio_spread": ratio.as_dict(),
                "ratio_vs_clm_ours": ours.as_dict(),
            }
        )
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
