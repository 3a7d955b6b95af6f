"""scripts/s3_local.py (the try-it S3 store): a bucket name SeaweedFS would refuse is refused at once, naming
the rule, instead of a start that waits for a bucket that can never be made."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("bucket", ["a", "ab", "Fusion", "under_score", "-dash", "dot.", "x" * 64])
def test_a_bucket_name_s3_refuses_is_refused_before_the_server_starts(bucket: str, tmp_path: Path) -> None:
    env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "scripts/s3_local.py", "start", str(tmp_path / "s3"), f"--bucket={bucket}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert f"--bucket ['{bucket}']" in out.stderr and "3-63 characters" in out.stderr
    assert not (tmp_path / "s3" / "weed.pid").exists()  # nothing was started


def test_the_bucket_rule_by_hand() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import s3_local
    finally:
        sys.path.pop(0)
    good = ["fusionrun", "abc", "my-bucket.v2", "0ab", "a" * 63]
    assert all(s3_local.BUCKET_NAME.fullmatch(b) for b in good)
    assert not any(s3_local.BUCKET_NAME.fullmatch(b) for b in ["ab", "a" * 64, "Abc", "a_b", "ab-", ".ab"])
