"""The command line: `fusionrun validate|run|stage` and `python -m jobs` (the Kubernetes Job command)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from jobs.cli import apply_env_overrides, main, stage_main
from jobs.settings import Settings
from jobs.spec import parse_spec

ROOT = Path(__file__).resolve().parents[1]
MISTRAL = "pkg://mistral_common/data/tokenizer.model.v1"
SPEC = {
    "target": {"name": "tgt", "tokenizer": MISTRAL, "randomInit": {}},
    "sources": [{"name": "src", "tokenizer": MISTRAL, "randomInit": {}}],
    "corpus": {"uri": "./c.txt", "heldoutFraction": 0.25},
    "extraction": {"maxLength": 64},
    "training": {"seqLen": 32},
    "store": {"uri": "file://./store"},
}


def _write_run(tmp_path: Path, spec: dict, name: str = "r1") -> Path:
    path = tmp_path / "run.yaml"
    doc = {
        "apiVersion": "fusionrun.dev/v1alpha1",
        "kind": "FusionRun",
        "metadata": {"name": name},
        "spec": spec,
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def test_validate_good_and_bad(tmp_path: Path, capsys) -> None:
    path = _write_run(tmp_path, SPEC)
    assert main(["validate", str(path)]) == 0
    assert "valid FusionRun 'r1': 2 models, 1 shard(s), 7 tasks" in capsys.readouterr().out
    bad = _write_run(tmp_path, {**SPEC, "extraction": {"maxLength": 64, "topK": 999}})
    assert main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "spec.extraction.topK: Input should be less than or equal to 256 (got 999)" in err


def test_stage_usage_errors_exit_2(capsys) -> None:
    import pytest

    for argv, msg in (
        (["extract", "--shard", "0"], "extract needs --model NAME"),
        (["fuse"], "fuse needs --shard N"),
        (["prepare", "--model", "x"], "prepare takes no --model"),
        (["bogus"], "invalid choice: 'bogus'"),
    ):
        with pytest.raises(SystemExit) as exit_:
            stage_main(argv)
        assert exit_.value.code == 2
        assert msg in capsys.readouterr().err


def test_stage_errors_name_the_problem(tmp_path: Path, capsys, monkeypatch) -> None:
    """Bad input exits 2 (jobs.retry: no retry can help); a dependency not done yet exits 1 (retriable)."""
    monkeypatch.delenv("FUSIONRUN_SPEC", raising=False)
    monkeypatch.delenv("FUSIONRUN_NAME", raising=False)
    assert stage_main(["prepare"]) == 2
    assert "no spec: pass --spec FILE or set FUSIONRUN_SPEC" in capsys.readouterr().err
    monkeypatch.setenv("FUSIONRUN_SPEC", json.dumps({**SPEC, "store": {"uri": str(tmp_path)}}))
    assert stage_main(["prepare"]) == 2
    assert "no run name: pass --run NAME or set FUSIONRUN_NAME" in capsys.readouterr().err
    monkeypatch.setenv("FUSIONRUN_NAME", "r1")
    assert stage_main(["extract", "--model", "nope", "--shard", "0"]) == 2
    assert "--model nope: no such model in the spec; known: ['tgt', 'src']" in capsys.readouterr().err
    assert stage_main(["align", "--model", "tgt", "--shard", "0"]) == 2
    assert "align takes a source model" in capsys.readouterr().err
    assert stage_main(["fuse", "--shard", "3"]) == 2
    assert "--shard 3: the run has extraction.shards=1" in capsys.readouterr().err
    # A task whose inputs were never made says which task to run first, and writes nothing.
    assert stage_main(["extract", "--model", "tgt", "--shard", "0"]) == 1
    err = capsys.readouterr().err
    assert "needs prepare, which has no manifest" in err and "run prepare first" in err
    assert not (tmp_path / "r1" / "extract").exists()


def test_python_m_jobs_prepare_like_a_kubernetes_job(tmp_path: Path) -> None:
    """The exact Job contract: spec as JSON in FUSIONRUN_SPEC, run name in FUSIONRUN_NAME; rerun skips."""
    (tmp_path / "c.txt").write_text("First paragraph of text.\n\nSecond one here.\n\nThird.\n\nFourth!\n")
    spec = {
        **SPEC,
        "corpus": {"uri": str(tmp_path / "c.txt"), "heldoutFraction": 0.25},
        "store": {"uri": f"file://{tmp_path / 'store'}"},
    }
    env = {
        **os.environ,
        "FUSIONRUN_SPEC": json.dumps(spec),
        "FUSIONRUN_NAME": "job1",
        "PYTHONPATH": str(ROOT),
    }
    cmd = [sys.executable, "-m", "jobs", "prepare"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert first.returncode == 0, first.stderr
    events = [json.loads(line)["event"] for line in first.stderr.splitlines() if line.startswith("{")]
    assert events[0] == "start" and events[-1] == "done"
    m = json.loads((tmp_path / "store" / "job1" / "prepare" / "manifest.json").read_text())
    assert m["counts"]["documents"] == 4 and m["counts"]["heldout_documents"] == 1
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert again.returncode == 0
    assert '"event": "skip"' in again.stderr and '"reason": "complete"' in again.stderr
    # The corpus file edited, the spec unchanged: prepare is stale and redone.
    with open(tmp_path / "c.txt", "a") as f:
        f.write("\nFifth paragraph.\n")
    third = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert third.returncode == 0 and '"reason": "corpus changed"' in third.stderr
    m = json.loads((tmp_path / "store" / "job1" / "prepare" / "manifest.json").read_text())
    assert m["counts"]["documents"] == 5


def test_s3_endpoint_override_from_env() -> None:
    store = {"uri": "s3://b/p", "endpoint": "https://s3.example", "insecure": False}
    spec = parse_spec({**SPEC, "store": store})
    settings = Settings.from_env({"FUSIONRUN_S3_ENDPOINT": "http://127.0.0.1:9999"})
    got = apply_env_overrides(spec, settings)
    assert got.store.endpoint == "http://127.0.0.1:9999" and got.store.insecure
    local = parse_spec({**SPEC, "store": {"uri": "/tmp/x"}})
    assert apply_env_overrides(local, settings) is local
    assert apply_env_overrides(spec, Settings()) is spec


def test_unreachable_s3_store_is_a_clear_failure(monkeypatch, capsys) -> None:
    store = {"uri": "s3://bucket/runs", "endpoint": "http://127.0.0.1:9", "insecure": True}
    monkeypatch.setenv("FUSIONRUN_SPEC", json.dumps({**SPEC, "corpus": {"uri": "/c.txt"}, "store": store}))
    monkeypatch.setenv("FUSIONRUN_NAME", "r1")
    monkeypatch.setenv("FUSIONRUN_S3_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("FUSIONRUN_S3_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("FUSIONRUN_S3_CHECK_SECONDS", "0")
    # issue 14: refused at the store check, before any work, is bad input (exit 2, not retried)
    assert stage_main(["prepare"]) == 2
    err = capsys.readouterr().err
    assert "S3 endpoint http://127.0.0.1:9: nothing listens there (connection refused)" in err
    assert "store.endpoint" in err


def test_run_prints_tasks_and_report(tmp_path: Path, capsys) -> None:
    """`fusionrun run --until prepare` in process: one line per task, then where the report is."""
    (tmp_path / "c.txt").write_text("One paragraph.\n\nAnother paragraph.\n\nA third.\n\nA fourth one.\n")
    path = _write_run(tmp_path, SPEC)
    assert main(["run", str(path), "--until", "prepare"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:2] == ["prepare", "ran"]
    assert f"report: {tmp_path / 'store' / 'r1' / 'report' / 'report.md'}" in out
    assert main(["run", str(path), "--until", "prepare"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split()[:2] == ["prepare", "skipped"]
