"""fusion.atomic: the one atomic-write helper (fsync, default mode, folder fsync, cleanup on failure)."""

from __future__ import annotations

import os
import stat

import pytest

from fusion.atomic import PARTIAL_SUFFIX, copy_atomic, umask, write_atomic


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_write_replaces_whole_file_with_default_mode(tmp_path):
    dst = tmp_path / "sub" / "a.bin"
    write_atomic(dst, b"old")
    write_atomic(dst, b"new contents")
    assert dst.read_bytes() == b"new contents"
    # mkstemp would leave 0600; any new file gets 0666 & ~umask (0644 under the usual umask 022).
    assert _mode(dst) == 0o666 & ~umask()
    assert [p.name for p in dst.parent.iterdir()] == ["a.bin"]


def test_writer_function_and_copy(tmp_path):
    dst = write_atomic(tmp_path / "f.txt", lambda f: f.write(b"via function"))
    assert dst.read_bytes() == b"via function"
    copy = copy_atomic(dst, tmp_path / "g.txt")
    assert copy.read_bytes() == b"via function"
    assert _mode(copy) == 0o666 & ~umask()


def test_failure_keeps_old_file_and_leaves_no_partial(tmp_path):
    dst = tmp_path / "keep.bin"
    write_atomic(dst, b"complete")

    def broken(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(dst, broken)
    assert dst.read_bytes() == b"complete"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(PARTIAL_SUFFIX)]
