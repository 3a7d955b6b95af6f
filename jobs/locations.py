"""Where things are: the one place a URI of the spec becomes something a stage can open.

URIs in a FusionRun spec (models, tokenizers, the corpus, evaluation texts, task folders):
  ./rel, ../rel, file://./rel   relative to the FusionRun file's folder (made absolute when it is loaded)
  /abs, file:///abs             a local file or folder
  pkg://package/sub/path        a path inside an installed Python package (fusion.hub resolves it)
  s3://bucket/prefix            an object or a folder (prefix) in S3, reached with the run store's endpoint
                                and credentials, downloaded into the cache (FUSIONRUN_CACHE)
  org/name, hf://org/name       a Hugging Face hub id (passed through: clusters with hub access)

The pure helpers (what kind a URI is, its local path) are fusion.uris, which imports nothing of ours;
`fetch` downloads, `stamp` fingerprints.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fusion.paths import resolve_path
from fusion.uris import glob_match, is_s3, local_path
from jobs.store import S3Endpoint, S3Store, Store, download_model, endpoint_of, objects_digest, parse_s3_uri

if TYPE_CHECKING:
    from jobs.spec import StoreSpec


def fetch(
    uri: str,
    where: Store | S3Endpoint | StoreSpec | None,
    kind: Literal["model", "text"] = "model",
    scratch: Path | None = None,
) -> str:
    """A local path (or a hub id, passed through) for `uri`.

    kind "model": an s3:// folder, downloaded once into the cache (a model's folder is not expected to
    change). kind "text": an s3:// object (downloaded into `scratch`) or folder (cached by its objects'
    ETags, so an edited corpus is fetched again). `where`: the run store, whose endpoint and credentials
    reach every s3:// URI of the run; StoreError when S3 cannot be read."""
    if is_s3(uri):
        if kind == "text":
            bucket, key = parse_s3_uri(uri)
            one = S3Store(endpoint_of(where), bucket, "")
            if key and one.size(key) is not None:  # one object
                dest = (scratch or Path("/tmp")) / "texts" / Path(key).name
                return str(one.download(key, dest))
        return download_model(where, uri, fresh=kind == "text")
    if uri.startswith(("pkg://", "file://")):
        return str(resolve_path(uri))
    return uri


def stamp(uri: str, where: Any = None, glob: str | None = None) -> str | None:
    """A cheap fingerprint of what is at `uri`: changes when a file is added, removed or rewritten.

    Local (a path, file://, pkg://): sha256 over the sorted (relative path, size, modification time) of the
    file, or of the folder's files matching `glob` (default all). s3://: over the sorted (key relative to
    the URI, size, ETag) of the object the URI names, else of those under it (a folder) matching `glob`,
    listed with `where`'s endpoint and credentials (jobs.store.endpoint_of). None when nothing is there;
    StoreError when S3 cannot be listed."""
    if is_s3(uri):
        return _s3_stamp(uri, where, glob)
    path = Path(resolve_path(uri)) if uri.startswith(("pkg://", "file://")) else local_path(uri)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.glob(glob or "**/*") if p.is_file())
    else:
        return None
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if f != path else f.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _s3_stamp(uri: str, where: Any, glob: str | None) -> str | None:
    bucket, key = parse_s3_uri(uri)
    src = S3Store(endpoint_of(where), bucket, "")
    if key and (st := src.stat(key)) is not None:  # one object (as it is read)
        return objects_digest([(key.rsplit("/", 1)[-1], *st)])
    cut = len(key) + 1 if key else 0
    pattern = glob or "**/*"
    objects = [
        (k[cut:], size, etag)
        for k, size, etag in src.list_stats(f"{key}/" if key else "")
        if not k.endswith("/") and glob_match(k[cut:], pattern)  # 'x/': a folder marker
    ]
    return objects_digest(objects) if objects else None
