"""The project's images, built by scripts/images.sh and run with podman the way a kubelet runs a stage pod:
the pod's user (10001), a read-only root filesystem, every capability dropped, no privilege escalation,
seccomp's default profile, and writable scratch only where the pod has an emptyDir.

Needs root and podman (installed by scripts/images.sh when missing); the tests that use it are marked
`images` and run with `make test-images` (and in CI)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGES_SH = ROOT / "scripts" / "images.sh"
POD_USER = "10001:10001"


def image_names() -> tuple[str, str]:
    out = subprocess.run(["bash", str(IMAGES_SH), "names"], capture_output=True, text=True, check=True)
    operator, job = out.stdout.split()
    return operator, job


def podman_argv() -> list[str]:
    """podman with runc when installed (crun refuses hybrid cgroup layouts) and rlimits no higher than
    this process's own (sandboxes without CAP_SYS_RESOURCE refuse to raise them)."""
    argv = ["podman"]
    if runc := shutil.which("runc"):
        argv += ["--runtime", runc]
    return argv


def ulimit_args() -> list[str]:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return [f"--ulimit=nofile={soft}:{hard}", "--ulimit=nproc=1000:1000"]


def pod_like_args() -> list[str]:
    """The hardening the operator's pod spec asks of the kubelet, as podman flags."""
    return [
        f"--user={POD_USER}",
        "--read-only",
        "--read-only-tmpfs=false",  # a pod's read-only root has no writable /tmp unless a volume is mounted
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
        "--security-opt=seccomp=/usr/share/containers/seccomp.json",
        "--network=none",
        *ulimit_args(),
    ]


def require_podman() -> None:
    if os.geteuid() != 0:
        pytest.skip("the image tests need root (podman, debootstrap)")
    if shutil.which("podman") is None and shutil.which("apt-get") is None:
        pytest.skip("no podman and no apt-get to install it")


def build_images() -> tuple[str, str]:
    """Build (or find up to date: podman's layer cache) both images; their names."""
    require_podman()
    subprocess.run(["bash", str(IMAGES_SH), "build"], check=True)
    return image_names()


def run(
    image: str,
    *args: str,
    volumes: dict[Path, str] | None = None,
    env: dict[str, str] | None = None,
    entrypoint: str | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    argv = [*podman_argv(), "run", "--rm", *pod_like_args()]
    for host, target in (volumes or {}).items():
        argv.append(f"--volume={host}:{target}")
    for key, value in (env or {}).items():
        argv.append(f"--env={key}={value}")
    if entrypoint is not None:
        argv.append(f"--entrypoint={entrypoint}")
    argv += [image, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
