"""URIs as strings: what kind a URI is and the local path it names, with no I/O (standard library only).

  ./rel, ../rel, file://./rel   relative to the FusionRun file's folder (made absolute when it is loaded)
  /abs, file:///abs             a local file or folder
  s3://bucket/prefix            an object or a folder in S3 (jobs.locations fetches it)

Every layer strips `file://` and recognises `s3://` through here (fusion, jobs, the operator), so imports
nothing of ours: the operator may import it although it never imports the fusion algorithms.
"""

from __future__ import annotations

import fnmatch
import re
import sys
from pathlib import Path

FILE = "file://"
S3 = "s3://"
_RELATIVE = re.compile(r"^(file://)?\.\.?/")


def is_s3(uri: str) -> bool:
    return uri.startswith(S3)


def is_relative(uri: str) -> bool:
    """./x, ../x, file://./x: relative to the FusionRun file (meaningless inside a cluster)."""
    return bool(_RELATIVE.match(uri))


def strip_file(uri: str) -> str:
    """A local URI without its file:// scheme (a plain path as it is)."""
    return uri.removeprefix(FILE)


def local_path(uri: str) -> Path:
    """The path of a local URI (file:// or a plain path), without fetching anything."""
    return Path(strip_file(uri))


def absolute_uri(uri: str | None, base: Path) -> str | None:
    """A relative local URI made absolute against `base` (the FusionRun file's folder); others unchanged."""
    if uri is None or not is_relative(uri):
        return uri
    if uri.startswith(FILE):
        return FILE + str((base / strip_file(uri)).resolve())
    return str((base / uri).resolve())


def glob_match(relpath: str, pattern: str) -> bool:
    """Whether a '/'-separated relative path matches a pathlib glob pattern as `Path.glob` finds files:
    '**' spans any number of folders (none included), other parts match one name (fnmatch, case-sensitive,
    leading dots included)."""
    parts = relpath.split("/")
    pats = [p for p in pattern.split("/") if p not in ("", ".")]
    if pats and pats[-1] == "**" and sys.version_info < (3, 13):
        return False  # a trailing '**' finds folders only before Python 3.13

    def match(i: int, j: int) -> bool:
        if j == len(pats):
            return i == len(parts)
        if pats[j] == "**":
            return any(match(k, j + 1) for k in range(i, len(parts) + 1))
        return i < len(parts) and fnmatch.fnmatchcase(parts[i], pats[j]) and match(i + 1, j + 1)

    return match(0, 0)
