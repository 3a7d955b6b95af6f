"""Atomic file writes: the one helper every artifact writer uses (shards, vocabulary maps, checkpoint
markers, the local store, the progress file).

A reader sees the whole new file or the old one, never a part: the bytes go to a temporary file in the
target's folder (same filesystem, so the rename is atomic), which is fsynced, given the mode any new file
gets (mkstemp's 0600 would hide it from another uid sharing the volume), renamed over the target, and the
folder is fsynced so that the rename itself survives a crash. On any failure the temporary file is removed.

Temporary files end in `.partial`; listings (jobs.store) skip them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

PARTIAL_SUFFIX = ".partial"


def umask() -> int:
    """The process umask, read without setting it (os.umask would briefly change it for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def fsync_dir(folder: Path) -> None:
    """fsync a folder (makes a rename in it durable); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without error the file written there
    replaces `path` atomically (fsynced, default file mode, folder fsynced). On error it is removed."""
    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=PARTIAL_SUFFIX, dir=dst.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dst.parent)


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], object]) -> Path:
    """Write `data` (bytes, or a function that writes to an open binary file) to `path` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        if isinstance(data, bytes | bytearray | memoryview):
            f.write(data)
        else:
            data(f)
    return Path(path)


def copy_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a file to `dst` atomically."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)
