"""The local backend beside the operator: spec.retry honoured (attempts, backoff, no retry of bad input),
the same status model written to the store, `fusionrun status/report` from the store, and a note on the
Kubernetes-only fields a local run ignores."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest
import yaml

from jobs.cli import main as cli_main
from jobs.local import LocalRunner, RunFailed, ignored_locally
from jobs.registry import Layout
from jobs.retry import retry_after
from jobs.spec import Retry, parse_spec
from jobs.store import LocalStore
from tests.test_local_pipeline import tiny_spec


def _flaky_python(tmp_path: Path, failures: int, code: int) -> str:
    """A `python` that exits `code` for the first `failures` task launches, then runs the real command."""
    count = tmp_path / "launches"
    script = tmp_path / "flaky-python"
    script.write_text(
        "#!/bin/sh\n"
        f"n=$(cat {count} 2>/dev/null || echo 0); echo $((n + 1)) > {count}\n"
        f'if [ "$n" -lt {failures} ]; then echo "injected failure {code}" >&2; exit {code}; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_retry_policy_is_pure_and_shared() -> None:
    retry = Retry(maxAttempts=3, backoffSeconds=10)
    assert [retry_after(retry, permanent=False, failures=n) for n in (1, 2, 3)] == [10, 20, None]
    assert retry_after(retry, permanent=True, failures=1) is None  # bad input: never retried


def test_a_failed_task_is_retried_after_its_backoff(tmp_path: Path) -> None:
    spec = parse_spec({**tiny_spec(tmp_path), "retry": {"maxAttempts": 3, "backoffSeconds": 1}})
    seen: list[tuple[str, str]] = []
    runner = LocalRunner(spec, "flaky", python=_flaky_python(tmp_path, failures=2, code=1))
    result = runner.run(until="prepare", on_task=lambda tid, outcome, _: seen.append((tid, outcome)))
    assert seen == [("prepare", "retry 2 of 3 in 1s"), ("prepare", "retry 3 of 3 in 2s"), ("prepare", "ran")]
    assert result.outcomes == {"prepare": "ran"}
    status = json.loads(LocalStore(tmp_path / "store" / "flaky").get_bytes(Layout.STATUS))
    [rec] = status["tasks"]
    assert (rec["id"], rec["state"], rec["attempts"], rec["failures"]) == ("prepare", "Succeeded", 3, 2)
    assert (rec["reason"], status["phase"], status["progress"]) == ("Completed", "Succeeded", "1/1")


def test_bad_input_fails_at_once_and_attempts_run_out(tmp_path: Path) -> None:
    spec = parse_spec({**tiny_spec(tmp_path), "retry": {"maxAttempts": 3, "backoffSeconds": 0}})
    with pytest.raises(RunFailed) as err:
        LocalRunner(spec, "bad", python=_flaky_python(tmp_path, failures=5, code=2)).run(until="prepare")
    assert err.value.rc == 2 and int((tmp_path / "launches").read_text()) == 1  # no retry
    (tmp_path / "launches").unlink()
    with pytest.raises(RunFailed) as err:
        LocalRunner(spec, "bad", python=_flaky_python(tmp_path, failures=5, code=1)).run(until="prepare")
    assert err.value.rc == 1 and int((tmp_path / "launches").read_text()) == 3  # maxAttempts
    status = json.loads(LocalStore(tmp_path / "store" / "bad").get_bytes(Layout.STATUS))
    assert status["tasks"][0]["state"] == "Failed" and status["tasks"][0]["failures"] == 3
    # the words of the operator's status for the same history (jobs.derive)
    message = "prepare: attempt 3 failed with exit code 1 (3 of 3 attempts failed)"
    assert (status["phase"], status["stage"], status["message"]) == ("Failed", "prepare", message)
    assert {c["type"]: c["reason"] for c in status["conditions"]}["Failed"] == "JobFailed"
    assert str(err.value).startswith(f"{message}; log: {tmp_path / 'store' / 'bad' / 'logs' / 'prepare.log'}")


def test_status_and_report_from_the_store_by_file_or_by_name(tmp_path: Path, capsys) -> None:
    doc = {"apiVersion": "fusionrun.dev/v1alpha1", "kind": "FusionRun", "metadata": {"name": "seen"}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**doc, "spec": tiny_spec(tmp_path)}))
    assert cli_main(["run", str(path), "--until", "prepare"]) == 0
    capsys.readouterr()
    assert cli_main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    assert "seen: Running (1/11) - extract: 0/4 tasks done, 0 running" in out
    assert "  prepare   Succeeded  1/1 tasks" in out and "  extract   Pending    0/4 tasks" in out
    store = str(tmp_path / "store")
    assert cli_main(["status", "seen", "--store", store, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["phase"] == "Running" and status["stages"]["prepare"]["state"] == "Succeeded"
    assert {c["type"]: c["status"] for c in status["conditions"]}["Prepared"] == "True"
    assert cli_main(["report", "seen", "--store", store, "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").is_file()
    assert cli_main(["status", "nobody", "--store", store]) == 1
    assert "no run 'nobody'" in capsys.readouterr().err


def test_kubernetes_only_fields_are_named_not_silently_ignored(tmp_path: Path, capsys) -> None:
    spec = {**tiny_spec(tmp_path), "suspend": True, "queueName": "q", "resources": {"extract": {"gpus": 1}}}
    assert ignored_locally(parse_spec(spec)) == ["resources", "suspend", "queueName"]
    assert ignored_locally(parse_spec(tiny_spec(tmp_path))) == []
    doc = {
        "apiVersion": "fusionrun.dev/v1alpha1",
        "kind": "FusionRun",
        "metadata": {"name": "k"},
        "spec": spec,
    }
    path = tmp_path / "k.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert cli_main(["validate", str(path)]) == 0
    err = capsys.readouterr().err
    assert "ignores the Kubernetes-only field(s) resources, suspend, queueName" in err


def test_baselines_train_on_the_same_blocks_and_are_compared(tmp_path: Path) -> None:
    """Self-distillation and sources-only are first-class variants: their own fused shards (the target's
    distribution alone; the sources alone), the same blocks and steps, and paired comparisons with FuseLLM."""
    spec = parse_spec(
        tiny_spec(tmp_path, clmBaseline=True, selfDistillBaseline=True, sourcesOnlyBaseline=True)
    )
    result = LocalRunner(spec, "base").run()
    assert {"fuse-self-00000", "fuse-sources-00001", "train-self", "train-sources"} <= set(result.outcomes)
    store = LocalStore(tmp_path / "store" / "base")
    metrics = json.loads(store.get_bytes(Layout.METRICS))
    assert set(metrics["models"]) == {"target-before", "fused", "clm", "self", "sources", "source:mis"}
    # the status the runner leaves: the operator's derivation (jobs.derive), training and metrics included
    status = json.loads(store.get_bytes(Layout.STATUS))
    n = len(result.outcomes)
    assert (status["phase"], status["stage"], status["progress"]) == ("Succeeded", "evaluate", f"{n}/{n}")
    assert status["message"] == f"all {n} tasks succeeded" and status["metrics"] == metrics
    assert [(p["variant"], p["percent"]) for p in status["training"]] == [
        ("clm", 100.0),
        ("fused", 100.0),
        ("self", 100.0),
        ("sources", 100.0),
    ]
    for baseline in ("clm", "self", "sources"):
        diff = metrics[f"fused_minus_{baseline}"]
        assert diff["ci95_low"] <= diff["bits_per_byte"] <= diff["ci95_high"]
    from fusion.format import read_shard

    own = read_shard(store.local_path("fuse/self/shard-00000.safetensors"), "fused")
    assert own.meta["candidates"] == ["tgt"] and set(own["choice"].tolist()) == {0}
    sources = read_shard(store.local_path("fuse/sources/shard-00000.safetensors"), "fused")
    assert sources.meta["candidates"] == ["mis"]
    fused = read_shard(store.local_path("fuse/shard-00000.safetensors"), "fused")
    assert fused.meta["candidates"] == ["tgt", "mis"]
    # The same documents and tokens in every variant: the blocks training packs are identical.
    for other in (own, sources):
        assert (other["input_ids"][:] == fused["input_ids"][:]).all()


def test_report_renders_alignment_and_every_baseline_comparison(tmp_path: Path) -> None:
    from jobs.report import _plot_alignment, render_alignment, render_markdown

    diag = {
        "method": "exact",
        "positions": 200,
        "received": 170,
        "lost_no_boundary": 24,
        "lost_at_boundary": 0,
        "lost_special": 4,
        "lost_normalised": 2,
        "received_fraction": 0.85,
        "boundary_fraction": 0.85,
        "mass_fraction": 0.97,
    }
    table = render_alignment({"gemma": diag})
    assert table[4] == "| gemma | exact | 200 | 85.0% | 85.0% | 97.0% | 12.0% | 0.0% | 2.0% | 1.0% |"
    assert _plot_alignment({"gemma": diag}, tmp_path / "a.png") and (tmp_path / "a.png").stat().st_size > 0
    diff = {"bits_per_byte": -0.0123, "ci95_low": -0.02, "ci95_high": -0.005}
    fused = {"bits_per_byte": 0.7, "perplexity": 5.0, "tokens": 9}
    metrics = {"models": {"fused": fused}, "fused_minus_clm": diff, "fused_minus_self": diff}
    md = render_markdown("r", {"metrics": metrics, "tasks": {}, "alignment": {"gemma": diag}}, {})
    assert "FuseLLM minus CLM-only: -0.0123" in md and "FuseLLM minus self-distillation: -0.0123" in md
    assert "## Alignment: what reached the target" in md


def test_fuse_records_source_value_and_the_report_renders_it(tmp_path: Path) -> None:
    """FuseLLM's fuse tasks keep the source-value diagnostics beside their shard; the report merges the
    shards and says, before any training figure, what the sources could teach."""
    from jobs.report import collect, render_markdown

    spec = parse_spec(tiny_spec(tmp_path, selfDistillBaseline=True, sourcesOnlyBaseline=True))
    LocalRunner(spec, "sv").run(until="fuse")
    store = LocalStore(tmp_path / "store" / "sv")
    record = json.loads(store.get_bytes("fuse/shard-00000.source-value.json"))
    assert [s["name"] for s in record["sources"]] == ["mis"] and record["positions"] > 0
    manifest = json.loads(store.get_bytes("fuse/shard-00000.manifest.json"))
    assert "fuse/shard-00000.source-value.json" in manifest["outputs"]
    data = collect(store, spec)
    value = data["source_value"]
    assert value["positions"] == sum(
        json.loads(store.get_bytes(f"fuse/shard-0000{s}.source-value.json"))["positions"] for s in (0, 1)
    )
    md = render_markdown("sv", {**data, "tiny_random_init": False}, {})
    assert "## Can the sources teach the target?" in md and f"**Verdict:** {value['verdict']}" in md
    # MinCE's choices are FuseLLM's own (one per training document), not the baselines' fused shards.
    fused = [json.loads(store.get_bytes(f"fuse/shard-0000{s}.manifest.json")) for s in (0, 1)]
    documents = sum(m["counts"]["documents"] for m in fused)
    assert sum(data["mince_choices"].values()) == documents > 0
