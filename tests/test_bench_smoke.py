"""The benchmarks' smoke (`python -m bench.run --smoke`, `make bench-smoke`): every benchmark `make bench`
runs, and the heavy real-model ones on tiny random-init models, at tiny sizes. It fails when a benchmark
crashes or one of its own checks fails (never on a timing), so that no benchmark rots unseen (issue 24:
`make bench` stopped at the operator benchmark once identical runs began to share their outputs). Here too:
differing runs must each make their own Jobs, identical runs exactly one Job among them, the others waiting
for it. A few minutes on 2 cores: the heavy ones share one tiny base run (bench.smoke)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.run import BENCHMARKS, HEAVY, SMOKE

REPO = Path(__file__).resolve().parent.parent
WITHOUT_CLUSTER = [n for n in SMOKE if n != "operator"]


def smoke(*names: str) -> subprocess.CompletedProcess[str]:
    paths = [
        str(REPO),
        str(REPO / "operator"),
        *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)),
    ]
    return subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", *names],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)},
        capture_output=True,
        text=True,
        timeout=1800,
    )


def said(out: subprocess.CompletedProcess[str]) -> str:
    return f"exit {out.returncode}\n--- stdout\n{out.stdout[-6000:]}\n--- stderr\n{out.stderr[-6000:]}"


def rows(stdout: str) -> dict[str, list[str]]:
    """A table of `label  value  value` lines (two or more spaces apart) as {label: values}."""
    out = {}
    for line in stdout.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) >= 2:
            out[cells[0]] = cells[1:]
    return out


def test_every_benchmark_has_a_smoke() -> None:
    assert set(SMOKE) == set(BENCHMARKS) | set(HEAVY)


def test_smoke_of_the_benchmarks_without_the_cluster() -> None:
    out = smoke(*WITHOUT_CLUSTER)
    assert out.returncode == 0, said(out)
    text = out.stdout
    for name in WITHOUT_CLUSTER:
        assert f"=== bench.{name}: exit 0 after" in text, said(out)
    # every table printed
    assert "meets the goal of <= 1/5" in text  # storage
    assert "checked on 2 ids: identical" in text and "identical paths" in text  # align vs plain Python
    assert "exact vs DTW + MinED" in text  # align: exact
    assert "extract / bare, median of per-round ratios" in text
    assert "fused / clm step time, median of per-round ratios" in text
    # cache_reuse: with reuse, the second run runs none of its tasks (all 4 reused); without, all 4
    assert re.search(r"\| with reuse \(default\) +\| +[\d.]+ \| +0 \| +4 \|", text), said(out)
    assert re.search(r"\| FUSIONRUN_REUSE=off +\| +[\d.]+ \| +4 \| +0 \|", text), said(out)
    assert "## Across runs (FuseLLM, the same held-out documents)" in text  # evidence
    assert "| topk-3 |" in text  # ablation


@pytest.mark.k8s
def test_smoke_of_the_operator_benchmark() -> None:
    from tests.harness.k8s import binaries_ready

    ok, reason = binaries_ready()
    if not ok:
        pytest.skip(reason)
    out = smoke("operator")
    assert out.returncode == 0, said(out)
    table = rows(out.stdout)
    # differing runs (each its own corpus): each its own Job; identical runs: one writer, two waiting
    assert table["burst: runs reconciled"] == ["3 / 3", "3 / 3"], said(out)
    assert table["burst: Jobs created"] == ["3", "1"], said(out)
    assert table["burst: runs with Jobs of their own"] == ["3", "1"], said(out)
    assert table["burst: runs waiting for / adopting shared outputs"] == ["0", "2"], said(out)
    assert table["errors (all of the above counted)"] == ["0", "0"], said(out)
    assert table["Jobs created"][:2] == ["8", "2"], said(out)  # scale: 4 shards x 2 models, before / after
