"""The train stage entrypoint: `python -m jobs train` against a file:// store, its launcher, its config.

The store is set up as the fuse stage leaves it (fused shards + their manifests, written with the same
jobs.complete functions); the stage then runs for real: its launcher starts 2 DeepSpeed ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs.settings import Settings
from jobs.stages.train import EXIT_PREEMPTED, group_exit_code, rank_envs, train_config

ROOT = Path(__file__).resolve().parents[1]


def spec_doc(tok_dir: Path, store: Path, **training) -> dict:
    tiny = {"architecture": "llama", "hiddenSize": 32, "numLayers": 2, "numHeads": 4, "seed": 0}
    return {
        "apiVersion": "fusionrun.dev/v1alpha1",
        "kind": "FusionRun",
        "metadata": {"name": "stage-test"},
        "spec": {
            "target": {"name": "target", "tokenizer": str(tok_dir), "randomInit": tiny},
            "sources": [{"name": "src", "tokenizer": str(tok_dir), "randomInit": {**tiny, "seed": 1}}],
            "corpus": {"uri": str(tok_dir)},
            "extraction": {"maxLength": 128, "shards": 2},
            "training": {
                "lambda": 0.9,
                "learningRate": 0.01,
                "warmupRatio": 0.0,
                "maxSteps": 4,
                "microBatchSize": 2,
                "gradAccum": 1,
                "seqLen": 32,
                "zeroStage": 2,
                "checkpointInterval": 2,
                "dtype": "float32",
                "clmBaseline": True,
                **training,
            },
            "store": {"uri": f"file://{store}"},
        },
    }


# ------------------------------------------------------------------------------------------------
# pure parts


def test_train_config_follows_the_spec():
    from jobs.spec import parse_spec

    spec = parse_spec(spec_doc(Path("/tok"), Path("/store"), betas=[0.8, 0.9], zeroStage=3)["spec"])
    fused, clm = train_config(spec, "fused"), train_config(spec, "clm")
    assert (fused.lam, fused.effective_lambda, clm.effective_lambda) == (0.9, 0.9, 1.0)
    assert fused.betas == (0.8, 0.9) and fused.zero_stage == 3 and fused.learning_rate == 0.01
    assert fused.max_steps == 4 and fused.seq_len == 32 and fused.checkpoint_interval == 2


# every spec.training field that reaches TrainConfig, at a value other than both defaults (camelCase keys)
NON_DEFAULT_TRAINING = {
    "lambda": 0.5,
    "lambdaFinal": 0.8,
    "loss": "kl",
    "learningRate": 0.02,
    "schedule": "linear",
    "warmupRatio": 0.1,
    "minLrRatio": 0.05,
    "weightDecay": 0.2,
    "betas": [0.8, 0.9],
    "gradClip": 0.5,
    "maxSteps": 7,
    "epochs": 2.5,
    "microBatchSize": 3,
    "gradAccum": 5,
    "seqLen": 64,
    "zeroStage": 3,
    "gradientCheckpointing": True,
    "checkpointInterval": 9,
    "seed": 7,
    "dtype": "bfloat16",
}


def test_every_train_config_field_comes_from_the_spec_and_every_training_field_reaches_it():
    """A new spec.training field or TrainConfig field cannot be forgotten: the field sets must match
    (through the rename table, less the launch/DAG fields), and every value must arrive."""
    from dataclasses import fields

    from fusion.train.config import TrainConfig
    from jobs.spec import Training, parse_spec
    from jobs.stages.train import NOT_TRAINING_FIELDS, RENAMED_FIELDS

    derived = {RENAMED_FIELDS.get(n, n) for n in Training.model_fields if n not in NOT_TRAINING_FIELDS}
    assert derived == {f.name for f in fields(TrainConfig)} - {"variant"}
    training_fields = set(Training.model_fields)
    assert training_fields >= NOT_TRAINING_FIELDS | set(RENAMED_FIELDS)

    spec = parse_spec(spec_doc(Path("/tok"), Path("/store"), **NON_DEFAULT_TRAINING)["spec"])
    assert len(NON_DEFAULT_TRAINING) == len(derived)  # a value for each field that reaches TrainConfig
    cfg, defaults = train_config(spec, "fused"), TrainConfig()
    source = {RENAMED_FIELDS.get(n, n): n for n in Training.model_fields}
    for f in fields(TrainConfig):
        if f.name != "variant":
            value = getattr(cfg, f.name)
            assert value == getattr(spec.training, source[f.name]), f.name
            assert (
                value != getattr(defaults, f.name) and value != Training.model_fields[source[f.name]].default
            )
    assert train_config(spec, "clm").variant == "clm"


def test_a_spec_field_train_config_lacks_is_an_error_not_a_silent_drop():
    from types import SimpleNamespace

    from jobs.spec import Training

    class Extended(Training):
        new_knob: int = 3

    with pytest.raises(TypeError, match="new_knob"):
        train_config(SimpleNamespace(training=Extended()), "fused")


def test_rank_envs_single_local_process_gets_defaults():
    envs = rank_envs({}, procs_per_node=1, nodes=1, port=29511)
    assert envs is not None and len(envs) == 1
    assert {k: envs[0][k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29511",
    }


def test_rank_envs_node_launcher_numbers_ranks_by_node():
    env = {
        "NODE_RANK": "1",
        "NNODES": "2",
        "NPROC_PER_NODE": "3",
        "MASTER_ADDR": "run-train-0.svc",
        "MASTER_PORT": "29500",
        "WORLD_SIZE": "6",
    }
    envs = rank_envs(env, procs_per_node=1, nodes=1)
    assert [(e["RANK"], e["LOCAL_RANK"]) for e in envs] == [("3", "0"), ("4", "1"), ("5", "2")]
    assert {e["MASTER_ADDR"] for e in envs} == {"run-train-0.svc"}
    assert {e["WORLD_SIZE"] for e in envs} == {"6"}


def test_rank_envs_leaves_an_existing_rank_alone_and_rejects_inconsistent_sizes():
    assert rank_envs({"RANK": "2"}, procs_per_node=4, nodes=1) is None
    with pytest.raises(ValueError, match=r"WORLD_SIZE=5 but nodes x procs_per_node = 2 x 2"):
        rank_envs(
            {"WORLD_SIZE": "5", "NNODES": "2", "NPROC_PER_NODE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"},
            1,
            1,
        )
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        rank_envs({"NNODES": "2", "NODE_RANK": "1"}, 1, 2)


def test_group_exit_code():
    assert group_exit_code([0, 0]) == 0
    assert group_exit_code([EXIT_PREEMPTED, 0]) == EXIT_PREEMPTED
    assert group_exit_code([EXIT_PREEMPTED, -9]) == 1
    assert group_exit_code([1, 0]) == 1


# ------------------------------------------------------------------------------------------------
# the stage, for real


@pytest.fixture(scope="module")
def fused_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A store holding what the fuse stage leaves: fused shards and their manifests."""
    from jobs.complete import Output, build_manifest, write_manifest
    from jobs.plan import Stage, Task, build_dag
    from jobs.spec import load_fusionrun
    from jobs.store import open_store
    from tests.test_train_data import train_tokenizer, write_corpus_shards

    d = tmp_path_factory.mktemp("train-stage")
    tok = train_tokenizer(d / "tok")
    spec_file = d / "run.yaml"
    spec_file.write_text(
        yaml.safe_dump(spec_doc(d / "tok", d / "store", procsPerNode=2, gradientCheckpointing=True))
    )
    run = load_fusionrun(spec_file)
    store = open_store(run.spec.store, run.metadata.name, Settings())
    by_id = {t.id: t for t in build_dag(run.spec)}
    paths = write_corpus_shards(tok, d / "shards", n_shards=2)
    from fusion.format import sha256_file

    for s, p in enumerate(paths):
        key = f"fuse/shard-{s:05d}.safetensors"
        store.upload(p, key)
        task = by_id[Task(Stage.fuse, shard=s).id]
        outputs = {key: Output(sha256_file(p), p.stat().st_size)}
        write_manifest(
            store, task, build_manifest(run.spec, task, outputs=outputs, inputs={}, started_at=0.0)
        )
    return {"spec": spec_file, "store": d / "store" / "stage-test", "dir": d}


def run_stage(spec: Path, *args: str, work: Path) -> subprocess.CompletedProcess:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK")
    }
    env |= {
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        "FUSIONRUN_WORK_DIR": str(work),
        "TOKENIZERS_PARALLELISM": "false",
    }
    return subprocess.run(
        [sys.executable, "-m", "jobs", "train", "--spec", str(spec), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def test_stage_launches_two_ranks_exports_and_writes_the_manifest_last(fused_run: dict, tmp_path: Path):
    proc = run_stage(fused_run["spec"], "--variant", "clm", work=tmp_path / "work")
    assert proc.returncode == 0, proc.stderr[-4000:]
    start = [json.loads(line) for line in proc.stdout.splitlines() if '"event": "start"' in line]
    assert len(start) == 1 and start[0]["world_size"] == 2 and start[0]["gradient_checkpointing"] is True
    assert start[0]["lambda"] == 1.0 and start[0]["bf16"] is False and start[0]["total_steps"] == 4
    steps = [json.loads(line) for line in proc.stdout.splitlines() if '"event": "step"' in line]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]  # logged once (rank 0), by both ranks' launcher
    assert all(s["fusion_loss"] is None and s["loss"] == s["clm_loss"] for s in steps)  # lambda = 1
    assert all(s["tokens"] == 2 * 2 * 32 for s in steps)  # 2 ranks x micro 2 x 32 tokens

    store = fused_run["store"]
    manifest = json.loads((store / "train" / "clm" / "manifest.json").read_text())
    assert manifest["task"] == "train-clm" and manifest["summary"]["steps"] == 4
    outputs = manifest["outputs"]
    assert {
        "train/clm/model/model.safetensors",
        "train/clm/model/config.json",
        "train/clm/model/tokenizer.json",
    } <= set(outputs)
    from fusion.format import sha256_file

    for key, o in outputs.items():
        assert sha256_file(store / key) == o["sha256"], key
    assert sorted(p.name for p in (store / "train" / "clm" / "checkpoints").iterdir()) == ["step-2", "step-4"]
    progress = json.loads((store / "train" / "clm" / "progress.json").read_text())
    assert progress["step"] == progress["total_steps"] == 4

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(store / "train" / "clm" / "model")
    assert model.config.vocab_size == 320

    # complete: a second invocation skips without training
    again = run_stage(fused_run["spec"], "--variant", "clm", work=tmp_path / "work")
    assert again.returncode == 0 and '"reason": "complete"' in again.stderr and '"step"' not in again.stdout

    # --force retrains from step 0 (the complete run's checkpoints are not resumed) and rewrites the manifest
    forced = run_stage(fused_run["spec"], "--variant", "clm", "--force", work=tmp_path / "work")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert '"event": "resumed"' not in forced.stdout
    redo = [json.loads(line) for line in forced.stdout.splitlines() if '"event": "step"' in line]
    assert [s["loss"] for s in redo] == [s["loss"] for s in steps]  # same seed, same data: same run
    assert (
        json.loads((store / "train" / "clm" / "manifest.json").read_text())["finished_at"]
        > manifest["finished_at"]
    )


def test_clm_variant_needs_the_baseline_switch(tmp_path: Path):
    spec = tmp_path / "run.yaml"
    spec.write_text(yaml.safe_dump(spec_doc(tmp_path, tmp_path / "store", clmBaseline=False)))
    proc = run_stage(spec, "--variant", "clm", work=tmp_path / "work")
    # bad input: exit 2 (jobs.retry), which the operator and the local runner do not retry
    assert proc.returncode == 2 and "training.clmBaseline" in proc.stderr


@pytest.mark.slow
def test_sigterm_to_the_launcher_checkpoints_exits_75_and_the_rerun_finishes(fused_run: dict, tmp_path: Path):
    """Kubernetes preemption: SIGTERM reaches the pod's main process (the launcher), which forwards it; the
    ranks finish the step, checkpoint, exit 75; the retried task resumes and completes."""
    spec = tmp_path / "run.yaml"
    doc = yaml.safe_load(fused_run["spec"].read_text())
    doc["spec"]["training"].update(maxSteps=400, checkpointInterval=1000)
    doc["spec"]["store"]["uri"] = f"file://{tmp_path / 'store'}"
    spec.write_text(yaml.safe_dump(doc))
    src = fused_run["store"] / "fuse"
    (tmp_path / "store" / "stage-test").mkdir(parents=True)
    shutil.copytree(src, tmp_path / "store" / "stage-test" / "fuse")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "FUSIONRUN_WORK_DIR": str(tmp_path / "work")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs", "train", "--spec", str(spec)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if '"event": "step", ' in line and '"step": 3,' in line:
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=240)
    lines += out.splitlines()
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    pre = [json.loads(x) for x in lines if '"event": "preempted"' in x]
    assert len(pre) == 1 and 3 <= pre[0]["step"] < 400
    stopped = pre[0]["step"]
    store = tmp_path / "store" / "stage-test" / "train" / "fused"
    assert (store / "checkpoints" / f"step-{stopped}" / "COMPLETE").is_file()
    assert not (store / "manifest.json").exists()

    again = run_stage(spec, work=tmp_path / "work")
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = [json.loads(x) for x in again.stdout.splitlines() if '"event": "resumed"' in x]
    assert [r["step"] for r in resumed] == [stopped]
    assert json.loads((store / "manifest.json").read_text())["summary"]["steps"] == 400
