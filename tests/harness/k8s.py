"""Pytest fixtures for a real Kubernetes control plane (etcd + kube-apiserver + kube-controller-manager
v1.20.2) on loopback, started once per test session by scripts/k8s-control-plane.sh on free ports.

Use in a test module:

    from tests.harness.k8s import k8s_fixture, k8s_namespace_fixture, kubelet_fixture  # noqa: F401

and ask for `k8s`, `k8s_namespace`, `kubelet` (the fixtures' names; the functions are named *_fixture so
that a test's arguments do not shadow an import):

- `k8s`: the session's ControlPlane (kubeconfig, `kubectl(...)`, a kubernetes ApiClient).
- `k8s_namespace`: a fresh namespace per test (deleted afterwards, without waiting).
- `kubelet`: a running StandInKubelet (tests/harness/kubelet.py) for that namespace.

The binaries come from `scripts/k8s-control-plane.sh build` (CI's `make test` runs it first). When they
are missing the fixture tries that build once (~6 min, needs root for apt-get); only if it fails are the
tests skipped, with the build's error as the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from tests.harness.kubelet import REPO_ROOT, StandInKubelet

SCRIPT = REPO_ROOT / "scripts" / "k8s-control-plane.sh"
T = TypeVar("T")


def kubectl_binary() -> str:
    """$KUBECTL, else kubectl on PATH, else the one `k8s-control-plane.sh build` made (machines without)."""
    if os.environ.get("KUBECTL"):
        return os.environ["KUBECTL"]
    found = shutil.which("kubectl")
    if found:
        return found
    bin_dir = subprocess.run(["bash", str(SCRIPT), "bin-dir"], capture_output=True, text=True).stdout.strip()
    return str(Path(bin_dir) / "kubectl")


class KubectlError(RuntimeError):
    def __init__(self, args: list[str], proc: subprocess.CompletedProcess[str]) -> None:
        super().__init__(f"kubectl {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}{proc.stdout}")
        self.returncode = proc.returncode
        self.stderr = proc.stderr
        self.stdout = proc.stdout


@dataclass
class ControlPlane:
    state_dir: Path
    kubeconfig: Path
    api_port: int
    kubectl_bin: str = field(default_factory=kubectl_binary)
    _api: client.ApiClient | None = field(default=None, repr=False)

    @property
    def env(self) -> dict[str, str]:
        """The environment for a subprocess (kubectl, the operator) that should talk to this API server."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def kubectl(
        self,
        *args: str,
        namespace: str | None = None,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        argv = [*(["-n", namespace] if namespace else []), *args]
        proc = subprocess.run(
            [self.kubectl_bin, *argv],
            input=input,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise KubectlError(argv, proc)
        return proc

    def kubectl_json(self, *args: str, namespace: str | None = None) -> dict[str, Any]:
        return yaml.safe_load(self.kubectl(*args, "-o", "json", namespace=namespace).stdout)

    def api(self) -> client.ApiClient:
        """A kubernetes ApiClient for this control plane (shared; the client is thread-safe)."""
        if self._api is None:
            self._api = config.new_client_from_config(config_file=str(self.kubeconfig))
        return self._api

    def create_namespace(self, prefix: str = "t") -> str:
        name = f"{prefix[:40].rstrip('-')}-{uuid.uuid4().hex[:6]}"
        client.CoreV1Api(self.api()).create_namespace({"metadata": {"name": name}})
        return name

    def delete_namespace(self, name: str) -> None:
        try:
            client.CoreV1Api(self.api()).delete_namespace(name)
        except ApiException as err:
            if err.status != 404:
                raise

    def apply_crds(self, path: Path = REPO_ROOT / "crds", timeout: float = 30) -> list[str]:
        """`kubectl apply` the CRDs in `path` and wait until the API server serves them (Established)."""
        out = self.kubectl("apply", "-f", str(path), "-o", "name").stdout.split()
        crds = [n for n in out if n.startswith("customresourcedefinition")]
        if crds:
            self.kubectl(
                "wait",
                "--for=condition=Established",
                f"--timeout={int(timeout)}s",
                *crds,
                timeout=timeout + 10,
            )
        return crds


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll until `predicate()` is truthy and return it; fail the test naming `what` (and the last value)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last value: {last!r}")
        time.sleep(interval)


def binaries_ready() -> tuple[bool, str]:
    """Whether the control plane can start; if not, try the build once and return its error."""
    probe = subprocess.run(["bash", str(SCRIPT), "build"], capture_output=True, text=True, timeout=1800)
    if probe.returncode != 0:
        return False, (
            f"Kubernetes control plane binaries are missing and could not be built "
            f"(bash scripts/k8s-control-plane.sh build): {probe.stderr.strip()[-800:]}"
        )
    return True, ""


def start_control_plane(state_dir: Path) -> ControlPlane:
    proc = subprocess.run(
        ["bash", str(SCRIPT), "start", str(state_dir)], capture_output=True, text=True, timeout=180
    )
    if proc.returncode != 0:
        subprocess.run(["bash", str(SCRIPT), "stop", str(state_dir)], capture_output=True, timeout=60)
        raise RuntimeError(f"k8s-control-plane.sh start failed:\n{proc.stderr}{proc.stdout}")
    ports = dict(line.split("=", 1) for line in (state_dir / "ports.env").read_text().split())
    return ControlPlane(
        state_dir=state_dir, kubeconfig=state_dir / "kubeconfig", api_port=int(ports["API_PORT"])
    )


def stop_control_plane(cp: ControlPlane) -> None:
    subprocess.run(["bash", str(SCRIPT), "stop", str(cp.state_dir)], capture_output=True, timeout=120)


# pytest gives every test module that imports a session fixture its own instance; one control plane per
# process is enough, so the modules' instances share this one and the last to finish stops it.
_shared: dict[str, Any] = {"cp": None, "users": 0}


@pytest.fixture(scope="session", name="k8s")
def k8s_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    if _shared["cp"] is None:
        ok, reason = binaries_ready()
        if not ok:
            pytest.skip(reason)
        _shared["cp"] = start_control_plane(tmp_path_factory.mktemp("k8s-control-plane"))
    _shared["users"] += 1
    try:
        yield _shared["cp"]
    finally:
        _shared["users"] -= 1
        if _shared["users"] == 0:
            stop_control_plane(_shared["cp"])
            _shared["cp"] = None


@pytest.fixture(name="k8s_namespace")
def k8s_namespace_fixture(k8s: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    # Namespace named after the test, so that a leftover object says where it came from.
    stem = request.node.name.removeprefix("test_").replace("_", "-").lower()
    ns = k8s.create_namespace("".join(c for c in stem if c.isalnum() or c == "-")[:40] or "t")
    yield ns
    k8s.delete_namespace(ns)


@pytest.fixture(name="kubelet")
def kubelet_fixture(k8s: ControlPlane, k8s_namespace: str, tmp_path: Path) -> Iterator[StandInKubelet]:
    kl = StandInKubelet(k8s.api(), k8s_namespace, tmp_path / "pod-logs")
    with kl:
        yield kl
    if kl.runs:  # shown by pytest only when the test fails
        print(f"stand-in kubelet pod logs ({k8s_namespace}):\n{kl.all_logs()}")
    assert not kl.errors, f"stand-in kubelet errors: {kl.errors}"
