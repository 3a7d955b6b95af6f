"""Real 2-process DeepSpeed training on CPU (gloo), ZeRO-2 and ZeRO-3, through fusion.train.loop.train.

Each test launches two ranks with subprocess, torchrun-style (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), OMP_NUM_THREADS=1. The model is a tiny random-init Llama over a BPE tokenizer trained on
the standard library's sources; the data are fused shards of those sources (tests/test_train_data.py).
This file is also the rank program: `python tests/test_train_distributed.py CONFIG.json`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


# ------------------------------------------------------------------------------------------------
# the rank program


def rank_main(config_path: str) -> int:
    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer

    from fusion.models import random_init_model
    from fusion.train.config import TrainConfig
    from fusion.train.data import FusedBlocks, ShardSource
    from fusion.train.loop import TrainIO, exit_code, train
    from jobs.registry import Layout
    from jobs.stages.train import StoreRecorder
    from jobs.store import LocalStore

    c = json.loads(Path(config_path).read_text())
    cfg = TrainConfig(**c["cfg"])
    tok = AutoTokenizer.from_pretrained(c["tokenizer"])
    model = random_init_model(
        "llama",
        vocab_size=len(tok),
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        seed=0,
        eos_token_id=tok.eos_token_id,
    )
    blocks = FusedBlocks(
        [ShardSource(Path(p)) for p in c["shards"]],
        cfg.seq_len,
        cfg.seed,
        with_targets=cfg.variant == "fused",
    )
    store = LocalStore(Path(c["store_root"]))
    io = TrainIO(
        Path(c["work_dir"]),
        store,
        store_checkpoints=Layout.checkpoints(cfg.variant),
        keep_checkpoints=c["keep_checkpoints"],
    )
    # the train stage's reporter: progress.json and history.jsonl in the store
    reporter = StoreRecorder(store, cfg.variant, interval_s=c["progress_interval_s"])
    rank = int(os.environ["RANK"])
    kill = c.get("kill")  # {"signal": "TERM"|"KILL", "rank": r, "event": "step"|"checkpoint", "step": n}

    def log(rec: dict) -> None:
        print(json.dumps(rec, sort_keys=True), flush=True)
        hit = kill and (rec.get("event"), rec.get("step")) == (kill["event"], kill["step"])
        if hit and rank == kill["rank"]:
            os.kill(os.getpid(), getattr(signal, "SIG" + kill["signal"]))

    result = train(cfg, model, blocks, io, tokenizer=tok, trace_blocks=True, log=log, reporter=reporter)
    return exit_code(result)


if __name__ == "__main__":
    sys.exit(rank_main(sys.argv[1]))


# ------------------------------------------------------------------------------------------------
# launching


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp: Path, name: str, config: dict, world: int = 2, timeout: float = 240.0) -> list[dict]:
    """Run `world` ranks to the end; return per rank {rc, records (parsed JSON lines), stderr}."""
    cfg_path = tmp / f"{name}.json"
    cfg_path.write_text(json.dumps(config))
    port = free_port()
    procs = []
    for r in range(world):
        env = {
            **os.environ,
            "RANK": str(r),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(r),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT),
            "TOKENIZERS_PARALLELISM": "false",
        }
        out = open(tmp / f"{name}.rank{r}.out", "w")  # noqa: SIM115
        err = open(tmp / f"{name}.rank{r}.err", "w")  # noqa: SIM115
        p = subprocess.Popen([PY, __file__, str(cfg_path)], env=env, stdout=out, stderr=err)
        procs.append((p, out, err))
    deadline = time.time() + timeout
    results = []
    for r, (p, out, err) in enumerate(procs):
        # a rank whose peer died blocks in a collective until gloo's timeout: kill it once a peer is gone
        while p.poll() is None:
            if time.time() > deadline or any(q.poll() not in (None, 0, 75) for q, _, _ in procs):
                time.sleep(1.0)
                if p.poll() is None:
                    p.kill()
            time.sleep(0.1)
        out.close()
        err.close()
        recs = [
            json.loads(line)
            for line in (tmp / f"{name}.rank{r}.out").read_text().splitlines()
            if line.startswith("{")
        ]
        stderr = (tmp / f"{name}.rank{r}.err").read_text()
        results.append({"rc": p.returncode, "records": recs, "stderr": stderr})
    return results


# ------------------------------------------------------------------------------------------------
# the tests

BASE_LR = 1e-2
# cosine, T = 8 updates, warmup ceil(0.25 * 8) = 2, min_lr_ratio 0.1; by hand:
#   s=0: 1/2   s=1: 2/2   s>=2: 0.1 + 0.9 * (1 + cos(pi * (s - 2) / 6)) / 2
#   s=3: 0.1 + 0.45 * (1 + 0.8660254) = 0.9397114   s=4: 0.1 + 0.45 * 1.5 = 0.775   s=5: 0.55
#   s=6: 0.1 + 0.45 * 0.5 = 0.325   s=7: 0.1 + 0.45 * (1 - 0.8660254) = 0.1602886
EXPECTED_LR = [BASE_LR * f for f in (0.5, 1.0, 1.0, 0.9397114, 0.775, 0.55, 0.325, 0.1602886)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from tests.test_train_data import train_tokenizer, write_corpus_shards

    d = tmp_path_factory.mktemp("train-corpus")
    tok = train_tokenizer(d / "tok")
    shards = write_corpus_shards(tok, d, n_shards=2)
    return {"tokenizer": str(d / "tok"), "shards": [str(p) for p in shards]}


def run_config(corpus: dict, tmp: Path, name: str, zero_stage: int, **extra) -> dict:
    cfg = {
        "variant": "fused",
        "lam": 0.9,
        "learning_rate": BASE_LR,
        "schedule": "cosine",
        "warmup_ratio": 0.25,
        "min_lr_ratio": 0.1,
        "max_steps": 8,
        "micro_batch_size": 2,
        "grad_accum": 2,
        "seq_len": 32,
        "zero_stage": zero_stage,
        "checkpoint_interval": 4,
        "seed": 1,
    }
    return {
        **corpus,
        "cfg": cfg,
        "keep_checkpoints": 2,
        "progress_interval_s": 0.0,
        "work_dir": str(tmp / name / "work"),
        "store_root": str(tmp / name / "store"),
        **extra,
    }


def records(rank_result: dict, event: str) -> list[dict]:
    return [r for r in rank_result["records"] if r.get("event") == event]


def assert_ok(results: list[dict], rc: int = 0) -> None:
    for r, res in enumerate(results):
        assert res["rc"] == rc, f"rank {r} exited {res['rc']}:\n{res['stderr'][-4000:]}"


def blocks_by_step(results: list[dict]) -> dict[int, list[int]]:
    """step -> the blocks all ranks trained on in that step (rank order)."""
    out: dict[int, list[int]] = {}
    for res in results:
        for rec in records(res, "step_rank"):
            out.setdefault(rec["step"], []).extend(rec["blocks"])
    return out


def exported_weights(model_dir: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.parametrize(
    ("zero_stage", "stop_signal"),
    [
        (2, "TERM"),
        (3, "KILL"),
        pytest.param(2, "KILL", marks=pytest.mark.slow),
        pytest.param(3, "TERM", marks=pytest.mark.slow),
    ],
)
def test_two_ranks_train_agree_checkpoint_resume_and_export(
    corpus: dict, tmp_path: Path, zero_stage: int, stop_signal: str
):
    import numpy as np

    # ---- an uninterrupted run of 8 steps
    full = launch(tmp_path, "full", run_config(corpus, tmp_path, "full", zero_stage))
    assert_ok(full)
    steps0, steps1 = records(full[0], "step"), records(full[0], "step_rank")
    assert [r["step"] for r in steps0] == list(range(1, 9))
    # the LR each update used, read from the optimizer's param_groups, is the schedule asked for
    assert [r["lr"] for r in steps0] == pytest.approx(EXPECTED_LR, rel=1e-6)
    # both ranks log the same (all-reduced) losses, having trained on different blocks
    for a, b in zip(steps1, records(full[1], "step_rank"), strict=True):
        assert a["loss"] == b["loss"] and a["fusion_loss"] == b["fusion_loss"]
        assert not set(a["blocks"]) & set(b["blocks"])
    assert all(r["tokens"] == 2 * 2 * 2 * 32 for r in steps0)  # micro 2 x accum 2 x 2 ranks x 32 tokens
    # the loss falls: last two steps well under the first (random init starts near ln(320) = 5.77)
    losses = [r["loss"] for r in steps0]
    assert losses[0] > 5.5 and np.mean(losses[-2:]) < losses[0] - 0.3, losses
    assert all(r["fusion_loss"] > 0 for r in steps0)
    # both ranks end with the same full weights
    done = [records(res, "done")[0] for res in full]
    assert done[0]["weights_sha256"] == done[1]["weights_sha256"]

    store = tmp_path / "full" / "store" / "train" / "fused"
    progress = json.loads((store / "progress.json").read_text())
    assert (
        progress["step"] == 8
        and progress["total_steps"] == 8
        and progress["lr"] == pytest.approx(EXPECTED_LR[-1], rel=1e-6)
    )
    assert set(progress) >= {"loss", "clm_loss", "fusion_loss", "tokens_per_s", "eta_seconds", "updated_at"}
    assert {
        p.relative_to(store / "checkpoints").parts[0]
        for p in (store / "checkpoints").rglob("*")
        if p.is_file()
    } == {"step-4", "step-8"}
    for s in (4, 8):
        marker = json.loads((store / "checkpoints" / f"step-{s}" / "COMPLETE").read_text())
        assert marker["step"] == s and "fusionrun_state.json" in marker["files"]
        assert {"rng-rank0.pt", "rng-rank1.pt"} <= set(marker["files"])

    # the exported model loads with transformers, generates, and holds exactly the trained weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tmp_path / "full" / "work" / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt = tok("def ", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 6
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        h.update(name.encode())
        h.update(p.detach().float().contiguous().numpy().tobytes())
    assert h.hexdigest() == done[0]["weights_sha256"]

    # ---- the same run interrupted. SIGTERM to rank 1 during step 5: both ranks finish step 6, save, exit
    # 75, and resume from their local disk. SIGKILL of rank 0 right after the step-4 checkpoint (no chance
    # to save), and the restart comes up on an empty disk: it resumes from the store alone.
    if stop_signal == "TERM":
        kill = {"signal": "TERM", "rank": 1, "event": "step_rank", "step": 5}
        expect_rc, expect_resume = 75, 6
    else:
        kill = {"signal": "KILL", "rank": 0, "event": "checkpoint", "step": 4}
        expect_rc, expect_resume = None, 4
    cut = launch(tmp_path, "cut", run_config(corpus, tmp_path, "cut", zero_stage, kill=kill))
    if expect_rc is not None:
        assert_ok(cut, rc=expect_rc)
        assert [r["step"] for r in records(cut[0], "preempted")] == [6]
    else:
        assert cut[0]["rc"] == -signal.SIGKILL
    work = tmp_path / "cut" / "work" / "checkpoints"
    store_ck = tmp_path / "cut" / "store" / "train" / "fused" / "checkpoints"
    # a newer checkpoint folder without its COMPLETE marker (a save cut short) must be ignored
    for root in (work, store_ck):
        partial = root / "step-7"
        partial.mkdir(parents=True, exist_ok=True)
        (partial / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    if stop_signal == "KILL":
        import shutil

        shutil.rmtree(tmp_path / "cut" / "work")  # a new pod: resume from the store alone
    resumed = launch(tmp_path, "resumed", run_config(corpus, tmp_path, "cut", zero_stage))
    assert_ok(resumed)
    assert [r["step"] for r in records(resumed[0], "resumed")] == [expect_resume]
    after = records(resumed[0], "step")
    assert [r["step"] for r in after] == list(range(expect_resume + 1, 9))
    assert [r["lr"] for r in after] == pytest.approx(EXPECTED_LR[expect_resume:], rel=1e-6)
    # the last 2 complete checkpoints stay; the marker-less step-7 leftover is cleared, locally and in store
    kept = {f"step-{expect_resume}", "step-8"}
    for root in (work, store_ck):  # (the file store leaves emptied folders behind: look at files)
        assert {p.relative_to(root).parts[0] for p in root.rglob("*") if p.is_file()} - {
            "latest",
            "zero_to_fp32.py",
            "zero_to_torch.py",
        } == kept

    # the training history in the store: each step once across the restart, both attempts' starts, the
    # logged figures (the full run's: one attempt, steps 1..8)
    from jobs.progress import read_history
    from jobs.store import LocalStore

    hist = read_history(LocalStore(tmp_path / "cut" / "store"), "fused")
    assert [r.step for r in hist.steps()] == list(range(1, 9))
    assert [(a.attempt, a.start_step, a.world_size) for a in hist.attempts()] == [
        (1, 0, 2),
        (2, expect_resume, 2),
    ]
    logged = {r["step"]: r["loss"] for r in [*records(cut[0], "step"), *after]}
    assert hist.curve("loss") == sorted(logged.items())
    full_hist = read_history(LocalStore(tmp_path / "full" / "store"), "fused")
    assert full_hist.curve("loss") == list(enumerate(losses, start=1)) and len(full_hist.attempts()) == 1
    assert [r.learning_rate for r in full_hist.steps()] == [r["lr"] for r in steps0]

    # every step trained on exactly the blocks of the uninterrupted run: none repeated, none skipped
    cut_blocks = {s: b for s, b in blocks_by_step(cut).items() if s <= expect_resume}
    assert {**cut_blocks, **blocks_by_step(resumed)} == blocks_by_step(full)
    # and the losses and final weights match the uninterrupted run
    assert [r["loss"] for r in after] == pytest.approx(losses[expect_resume:], rel=1e-5)
    a = exported_weights(model_dir)
    b = exported_weights(tmp_path / "cut" / "work" / "model")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
