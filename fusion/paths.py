"""Where a model or tokenizer file is, for the URIs fusion understands (pure: imports nothing heavy).

  /abs/path, ./rel/path, file:///abs/path     a local file or folder
  pkg://<python package>/<sub path>           a file or folder shipped inside an installed package, found
                                              with importlib.util.find_spec WITHOUT importing the package
  org/name, hf://org/name                     a Hugging Face id, passed to from_pretrained as is

s3:// is the jobs layer's business (jobs.locations downloads first and passes a local path).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from fusion.uris import FILE, is_s3, local_path

HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_id(uri: str) -> str | None:
    """The Hugging Face id a URI stands for, or None when it is a local/package location."""
    if uri.startswith("hf://"):
        return uri[len("hf://") :]
    if "://" in uri or uri.startswith(("/", "./", "../")):
        return None
    if HF_ID.match(uri) and not Path(uri).exists():
        return uri
    return None


def resolve_path(uri: str) -> Path:
    """A local path for a local, file:// or pkg:// URI (existence is not checked; callers name the file)."""
    if is_s3(uri):
        raise ValueError(
            f"{uri}: s3:// URIs are not read by fusion.hub; download the object to a local folder first "
            "(the jobs store does) and pass that path"
        )
    if uri.startswith("hf://"):
        raise ValueError(f"{uri}: a Hugging Face id has no local path; pass it to load_tokenizer as is")
    if uri.startswith(FILE):
        return local_path(uri)
    if uri.startswith("pkg://"):
        package, _, sub = uri[len("pkg://") :].partition("/")
        if not package:
            raise ValueError(f"{uri}: expected pkg://<python package>/<sub path>")
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(
                f"{uri}: Python package {package!r} is not installed (or is not a package folder); "
                f"install it into this environment (e.g. pip install {package.replace('_', '-')})"
            )
        return Path(next(iter(spec.submodule_search_locations))) / sub
    if "://" in uri:
        raise ValueError(f"{uri}: unknown URI scheme; use a local path, file://, pkg:// or a Hugging Face id")
    return Path(uri)
