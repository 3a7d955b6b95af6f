"""The local runner end to end on a very tiny run: every task as a real subprocess (`python -m jobs ...`),
DeepSpeed training included; rerun skips everything; a run killed mid-extract resumes; the same run with the
store on a real S3 server (SeaweedFS)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from jobs.cache import cache_of
from jobs.complete import manifest_key, read_manifest
from jobs.local import LocalRunner, RunFailed, threads_for
from jobs.plan import Stage, Task, build_dag
from jobs.settings import Settings
from jobs.spec import parse_spec
from jobs.store import open_store
from tests.artifacts import output_file
from tests.conftest import MISTRAL_URI, SMOLLM2_GGUF, SMOLLM2_URI
from tests.harness.s3 import ENDPOINT

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Return a new list containing all items from the iterable in ascending order.",
    "A custom key function can be supplied to customize the sort order.",
    "def add(a, b):\n    return a + b",
    "Numbers 12345 and symbols: {}, [], ().",
    "Unicode: naïve café, emoji ✓, and more text to read.",
    "Another short paragraph about reading files line by line.",
    "The last document of this very small corpus.",
]


def tiny_spec(tmp_path: Path, store: dict | None = None, **training) -> dict:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(DOCS))
    small = {"hiddenSize": 32, "numLayers": 1, "numHeads": 2}
    return {
        "target": {
            "name": "tgt",
            "tokenizer": SMOLLM2_URI,
            "ggufFile": SMOLLM2_GGUF,
            "randomInit": {"architecture": "llama", **small},
        },
        "sources": [
            {
                "name": "mis",
                "tokenizer": MISTRAL_URI,
                "randomInit": {"architecture": "gpt_neox", **small, "seed": 7},
            }
        ],
        "corpus": {"uri": str(corpus), "heldoutFraction": 0.25},
        "extraction": {"maxLength": 32, "topK": 4, "shards": 2, "device": "cpu", "dtype": "float32"},
        "training": {
            "seqLen": 16,
            "maxSteps": 2,
            "microBatchSize": 2,
            "gradAccum": 1,
            "zeroStage": 0,
            "learningRate": 0.001,
            "dtype": "float32",
            "checkpointInterval": 1,
            **training,
        },
        "store": store or {"uri": str(tmp_path / "store")},
    }


def test_thread_shares() -> None:
    extract = Task(Stage.extract, "m", 0)
    train = Task(Stage.train, variant="fused")
    assert threads_for(extract, 1, 2) == 2  # alone: every core
    assert threads_for(extract, 2, 2) == 1  # two in parallel: one core each
    assert threads_for(extract, 3, 8) == 2
    assert threads_for(train, 2, 2) == 2  # training runs alone with every core


def _check_complete_run(store, spec, report: Path | None) -> dict:
    dag = build_dag(spec)
    for t in dag:
        assert read_manifest(store, manifest_key(t)) is not None, t.id
    metrics = json.loads(store.get_bytes("evaluate/metrics.json"))
    assert set(metrics["models"]) == {"target-before", "fused", "source:mis"}
    assert metrics["heldout"]["documents"] == 2  # round(0.25 * 8)
    for m in metrics["models"].values():
        assert 0 < m["bits_per_byte"] < 100 and m["perplexity"] > 1
    if report is not None:
        text = report.read_text()
        assert "| target (before) |" in text and "| FuseLLM |" in text and "| mis (source) |" in text
        assert (report.parent / "bpb.png").stat().st_size > 1000
    return metrics


def test_local_run_end_to_end_then_rerun_skips_all(tmp_path: Path) -> None:
    spec_dict = tiny_spec(tmp_path)  # writes the corpus file once: rewriting it would redo prepare
    spec = parse_spec(spec_dict)
    lines: list[tuple[str, str]] = []
    runner = LocalRunner(spec, "e2e", extra_env={"OMP_NUM_THREADS": "1"})
    result = runner.run(on_task=lambda tid, outcome, s: lines.append((tid, outcome)))
    n_tasks = len(build_dag(spec))  # prepare, 2x2 extract, 2 align, 2 fuse, train, evaluate
    assert n_tasks == 11 and result.ran == n_tasks and result.skipped == 0
    store = open_store(spec.store, "e2e", Settings())
    _check_complete_run(store, spec, result.report)
    assert result.report == tmp_path / "store" / "e2e" / "report" / "report.md"
    assert store.exists("report/report.json")
    assert (tmp_path / "store" / "e2e" / "logs" / "train.log").is_file()
    # training's default scratch folder (checkpoints, export) is gone once the model is in the store
    where = hashlib.sha256(store.base_uri.encode()).hexdigest()[:12]
    assert not (Path(tempfile.gettempdir()) / f"fusionrun-e2e-train-{where}").exists()
    manifests = {k: store.get_bytes(k) for k in store.list("") if k.endswith("manifest.json")}

    again = LocalRunner(spec, "e2e").run()
    assert again.ran == 0 and again.skipped == n_tasks
    assert {k: store.get_bytes(k) for k in manifests} == manifests  # nothing rewritten

    # A spec change that decides fusion redoes fuse and what follows it, nothing before; a shard corrupted
    # in place (same size) is caught by the runner's checksum check and redone too.
    shard = output_file(tmp_path / "store", "e2e", Task(Stage.extract, "mis", 1))
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x55
    shard.write_bytes(bytes(data))
    changed = parse_spec({**spec_dict, "fusion": {"strategy": "avgCE"}})
    third = LocalRunner(changed, "e2e").run()
    ran = {k for k, v in third.outcomes.items() if v == "ran"}
    # The redone shard has the same bytes as before, so align-mis-00001, which read it, stays valid.
    assert ran == {"extract-mis-00001", "fuse-00000", "fuse-00001", "train", "evaluate"}
    assert shard.read_bytes() != bytes(data)  # really rewritten (the task verifies too, not only the runner)

    # Another held-out text (evaluation.corpora) redoes only evaluate; every model is scored on it too.
    code = tmp_path / "code.txt"
    code.write_text("def f(x):\n    return x + 1\n\nclass A:\n    pass\n\nimport os\nprint(os.sep)\n")
    with_code = {
        **spec_dict,
        "fusion": {"strategy": "avgCE"},
        "evaluation": {"corpora": [{"name": "code", "uri": str(code)}]},
    }
    fourth = LocalRunner(parse_spec(with_code), "e2e").run()
    assert {k for k, v in fourth.outcomes.items() if v == "ran"} == {"evaluate"}
    metrics = json.loads(store.get_bytes("evaluate/metrics.json"))
    block = metrics["corpora"]["code"]
    assert block["documents"] == 3 and block["bytes"] == len(code.read_text().strip()) - 4  # 2 blank lines
    assert set(block["models"]) == set(metrics["models"]) == {"target-before", "fused", "source:mis"}
    assert block["models"]["fused"]["bits_per_byte"] != metrics["models"]["fused"]["bits_per_byte"]
    assert "## Held-out text: code" in (tmp_path / "store" / "e2e" / "report" / "report.md").read_text()
    code.write_text(code.read_text() + "\nx = 1\n")  # edited in place, spec unchanged: evaluate is redone
    fifth = LocalRunner(parse_spec(with_code), "e2e").run()
    assert {k for k, v in fifth.outcomes.items() if v == "ran"} == {"evaluate"}
    assert json.loads(store.get_bytes("evaluate/metrics.json"))["corpora"]["code"]["documents"] == 4
    assert LocalRunner(parse_spec(with_code), "e2e").run().ran == 0
    missing = {**with_code, "evaluation": {"corpora": [{"name": "code", "uri": str(tmp_path / "nope.txt")}]}}
    with pytest.raises(RunFailed) as err:
        LocalRunner(parse_spec(missing), "e2e").run()
    assert err.value.task_id == "evaluate"
    log = (tmp_path / "store" / "e2e" / "logs" / "evaluate.log").read_text()
    assert "evaluation.corpora.0.uri: " in log and "nope.txt does not exist" in log


def test_failure_stops_the_run_and_names_the_log(tmp_path: Path) -> None:
    spec = parse_spec({**tiny_spec(tmp_path), "corpus": {"uri": str(tmp_path / "missing.txt")}})
    with pytest.raises(RunFailed) as err:
        LocalRunner(spec, "bad").run()
    assert err.value.task_id == "prepare"
    log = tmp_path / "store" / "bad" / "logs" / "prepare.log"
    assert str(log) in str(err.value) and "missing.txt does not exist" in log.read_text()
    assert not (tmp_path / "store" / "bad" / "extract").exists()


def test_killed_mid_extract_then_resumed(tmp_path: Path) -> None:
    """SIGKILL the whole runner (and its task processes) while extraction runs; the rerun skips what was
    complete, leaves it untouched and redoes the rest."""
    spec_dict = tiny_spec(tmp_path)
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "fusionrun.dev/v1alpha1",
                "kind": "FusionRun",
                "metadata": {"name": "kill"},
                "spec": spec_dict,
            }
        )
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "jobs.cli", "run", str(path), "--until", "extract"]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    logs = tmp_path / "store" / "kill" / "logs"
    deadline = time.monotonic() + 300
    killed_during = None
    while time.monotonic() < deadline and proc.poll() is None:
        for log in sorted(logs.glob("extract-*.log")) if logs.is_dir() else []:
            text = log.read_text()
            if '"event": "start"' in text and '"event": "done"' not in text:
                killed_during = log.stem
                break
        if killed_during:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert killed_during is not None, "extraction never seen running"
    spec = parse_spec(spec_dict)
    store = open_store(spec.store, "kill", Settings())
    dag = build_dag(spec)
    done_before = {t.id: store.get_bytes(manifest_key(t)) for t in dag if store.exists(manifest_key(t))}
    assert "prepare" in done_before and killed_during not in done_before
    outputs = [  # (task, logical key) of every output of a task complete before the kill
        (t, k)
        for t in dag
        if t.id in done_before
        for k in json.loads(done_before[t.id])["outputs"]
        if k.endswith(".safetensors")
    ]
    shards_before = {
        (t.id, k): output_file(tmp_path / "store", "kill", t, k).read_bytes() for t, k in outputs
    }
    assert shards_before  # prepare's, at least

    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    for tid in done_before:
        assert any(line.split()[:2] == [tid, "skipped"] for line in out.stdout.splitlines()), out.stdout
    assert any(line.split()[:2] == [killed_during, "ran"] for line in out.stdout.splitlines())
    for tid, m in done_before.items():
        assert store.get_bytes(manifest_key(next(t for t in dag if t.id == tid))) == m
    for (tid, k), data in shards_before.items():  # complete outputs untouched, byte for byte
        task = next(t for t in dag if t.id == tid)
        assert output_file(tmp_path / "store", "kill", task, k).read_bytes() == data
    for t in dag:
        if t.stage.value in ("prepare", "extract"):
            assert store.exists(manifest_key(t)), t.id


@pytest.mark.s3
def test_local_run_with_store_on_seaweedfs(s3_server, s3_bucket, tmp_path: Path) -> None:
    store_spec = {"uri": f"s3://{s3_bucket}/runs", "endpoint": ENDPOINT, "insecure": True}
    spec = parse_spec(tiny_spec(tmp_path, store=store_spec))
    runner = LocalRunner(spec, "s3run", local_dir=tmp_path / "local", extra_env={"OMP_NUM_THREADS": "1"})
    result = runner.run()
    assert result.ran == len(build_dag(spec))
    store = open_store(spec.store, "s3run", Settings())
    _check_complete_run(store, spec, result.report)
    keys = store.list("")
    extract = read_manifest(store, Task(Stage.extract, "tgt", 0))
    entry_keys = cache_of(store).list(extract["entry"])  # the shard is in the store's shared area
    assert extract["entry"] + "/shard.safetensors" in entry_keys and "train/fused/model/config.json" in keys
    assert "report/report.md" in keys and result.report == tmp_path / "local" / "report" / "report.md"
    # Every object is in the bucket, under the run's prefix or the shared cache beside it: nothing was
    # written to the local store path.
    raw = s3_server.client().list_objects_v2(Bucket=s3_bucket, Prefix="runs/s3run/")
    assert raw["KeyCount"] == len(keys) or raw.get("IsTruncated")
    shared = s3_server.client().list_objects_v2(Bucket=s3_bucket, Prefix="runs/_cache/")
    assert shared["KeyCount"] == len(cache_of(store).list(""))
    assert LocalRunner(spec, "s3run", local_dir=tmp_path / "local").run().skipped == len(build_dag(spec))


@pytest.mark.slow
def test_tiny_local_example_end_to_end(tmp_path: Path) -> None:
    """examples/tiny-local.yaml as shipped (store moved to tmp): `make demo`'s run, ~5-15 min on 2 cores."""
    doc = yaml.safe_load((ROOT / "examples" / "tiny-local.yaml").read_text())
    doc["spec"]["corpus"]["uri"] = str(ROOT / "examples" / "data" / "stdlib-docstrings.txt")
    doc["spec"]["store"]["uri"] = str(tmp_path / "runs")
    # The example's other relative paths (evaluation.taskDirs) resolve against its own folder.
    doc["spec"]["evaluation"]["taskDirs"] = [
        str(ROOT / "examples" / d) for d in doc["spec"]["evaluation"]["taskDirs"]
    ]
    path = tmp_path / "tiny-local.yaml"
    path.write_text(yaml.safe_dump(doc))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "run", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = tmp_path / "runs" / "tiny-local" / "report" / "report.md"
    assert f"report: {report}" in out.stdout
    metrics = json.loads((tmp_path / "runs" / "tiny-local" / "evaluate" / "metrics.json").read_text())
    assert set(metrics["models"]) == {
        "target-before",
        "fused",
        "clm",
        "source:neox-mistral",
        "source:qwen2-qwen",
    }
    # Training helps on held-out text even at this size (random init -> a few dozen steps).
    assert metrics["models"]["fused"]["bits_per_byte"] < metrics["models"]["target-before"]["bits_per_byte"]
    # Per-document bits add up to the totals; the paired comparison is their difference, inside its interval.
    for m in metrics["models"].values():
        assert len(m["doc_bits"]) == len(m["doc_bytes"]) == metrics["heldout"]["documents"]
        assert sum(m["doc_bits"]) / sum(m["doc_bytes"]) == pytest.approx(m["bits_per_byte"], abs=1e-4)
    diff = metrics["fused_minus_clm"]
    expected = metrics["models"]["fused"]["bits_per_byte"] - metrics["models"]["clm"]["bits_per_byte"]
    assert diff["bits_per_byte"] == pytest.approx(expected, abs=1e-4)
    assert diff["ci95_low"] <= diff["bits_per_byte"] <= diff["ci95_high"]
    assert "FuseLLM minus CLM-only:" in report.read_text()
    again = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "run", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0 and " 0 ran, 16 skipped" in again.stdout


def test_sigterm_while_a_task_starts_stops_that_task_too(tmp_path: Path, monkeypatch) -> None:
    """SIGTERM that lands right after a task's process is started, before the runner records it: the
    runner still stops and reaps that process (it once raised in the signal handler and leaked it)."""
    import jobs.local

    started: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def popen_then_sigterm(*args, **kwargs):
        proc = real_popen([sys.executable, "-c", "import time; time.sleep(60)"], **kwargs)
        started.append(proc)
        os.kill(os.getpid(), signal.SIGTERM)  # delivered here, inside the runner's launch
        return proc

    monkeypatch.setattr(jobs.local.subprocess, "Popen", popen_then_sigterm)
    with pytest.raises(jobs.local.RunStopped, match="stopped by SIGTERM"):
        LocalRunner(parse_spec(tiny_spec(tmp_path)), "term").run()
    assert len(started) == 1 and started[0].poll() is not None  # stopped and reaped, not left running
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the runner's handler is gone


def test_sigterm_stops_the_runner_and_its_tasks(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "fusionrun.dev/v1alpha1",
                "kind": "FusionRun",
                "metadata": {"name": "term"},
                "spec": tiny_spec(tmp_path),
            }
        )
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "jobs.cli", "run", str(path), "--until", "extract"]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    children_file = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    deadline = time.monotonic() + 300
    children: list[int] = []
    while time.monotonic() < deadline and proc.poll() is None:
        logs = tmp_path / "store" / "term" / "logs"
        if logs.is_dir() and any(p.name.startswith("extract-") for p in logs.iterdir()):
            children = [int(c) for c in children_file.read_text().split()]
            if children:
                break
        time.sleep(0.05)
    assert children, "no extract task seen running"
    proc.send_signal(signal.SIGTERM)  # the runner alone, as `kill PID` would
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "stopped; rerun the same command to resume" in err
    for pid in children:  # the runner stopped (and reaped) its running tasks before exiting
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
