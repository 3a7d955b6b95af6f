"""The artifact store: where every stage reads its inputs and writes its outputs.

Two backends behind one small interface, with keys relative to `<store uri>/<run name>/`:
- a local folder (`file:///abs/path`, `/abs/path`): writes go to a temporary file beside the target and are
  renamed into place, so a reader sees a whole object or none;
- S3 (`s3://bucket/prefix`) through boto3: AWS, MinIO, SeaweedFS, Ceph. Multipart transfers, botocore's
  retries with exponential backoff (bounded attempts), path-style addressing for custom endpoints, and
  credentials from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, which Kubernetes fills from
  the run's Secret) or boto3's default chain (pod identity). S3 PUTs are atomic by nature.

Failures become `StoreError` naming the endpoint, bucket or key and the fix, with a CamelCase `reason` a
program can match; credentials are never logged: keys are checked when they are read (surrounding whitespace
such as the newline of `echo key > file` is dropped; whitespace or control characters inside are refused
without echoing the value) and error texts go through jobs.credentials.redact.
This module imports no torch: the operator uses it.
"""

from __future__ import annotations

import hashlib
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fusion.atomic import PARTIAL_SUFFIX, atomic_path, copy_atomic, write_atomic
from fusion.uris import S3, is_s3, strip_file
from jobs import credentials
from jobs.credentials import redact
from jobs.settings import Settings
from jobs.spec import StoreSpec


class StoreError(RuntimeError):
    """The store cannot be used as configured; the message names what and how to fix it.

    permanent: retrying cannot help (no such bucket, access denied, no credentials, a malformed URI).
    reason: what went wrong in one CamelCase word (StoreUnreachable, NoCredentials, InvalidCredentials,
    BucketNotFound, AccessDenied, ObjectNotFound, S3Error, StoreError)."""

    def __init__(self, message: str, permanent: bool = False, reason: str = "StoreError"):
        super().__init__(message)
        self.permanent = permanent
        self.reason = reason


class Store(ABC):
    """Objects under one run's prefix. Keys use '/' and never start with '/'. `settings`: the process's
    (jobs.settings), given to open_store; whatever the store opens in turn (its sibling, S3 objects of
    the run) is opened with them."""

    base_uri: str
    settings: Settings

    def uri_for(self, key: str) -> str:
        return f"{self.base_uri.rstrip('/')}/{_clean_key(key)}"

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int | None:
        """Size in bytes, or None when the object does not exist."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def upload(self, local_path: str | os.PathLike, key: str) -> None: ...

    @abstractmethod
    def download(self, key: str, local_path: str | os.PathLike) -> Path: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys under `prefix` (relative to the run), sorted."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix`; return how many were deleted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object if it exists."""

    def local_path(self, key: str) -> Path | None:
        """The object's own file when the store is a local folder (readers skip a copy), else None."""
        return None

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Write the object only if it does not exist yet, atomically: True when this call created it,
        False when it was already there (one winner among concurrent callers: leases, jobs.cache)."""

    @abstractmethod
    def sibling(self, name: str) -> Store:
        """The store of another prefix beside this one (`<store uri>/<name>/`), the same service and
        credentials: runs reach the shared cache area (jobs.cache) this way."""


def _clean_key(key: str) -> str:
    key = key.strip("/")
    if not key or ".." in key.split("/"):
        raise StoreError(f"invalid store key {key!r}: keys are relative paths without '..'")
    return key


class LocalStore(Store):
    def __init__(self, root: Path, settings: Settings | None = None):
        self.root = root
        self.base_uri = f"file://{root}"
        self.settings = settings or Settings()

    def _p(self, key: str) -> Path:
        return self.root / _clean_key(key)

    def exists(self, key: str) -> bool:
        return self._p(key).is_file()

    def size(self, key: str) -> int | None:
        p = self._p(key)
        return p.stat().st_size if p.is_file() else None

    def get_bytes(self, key: str) -> bytes:
        p = self._p(key)
        try:
            return p.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"{self.uri_for(key)}: no such object; rerun the stage that writes it") from None

    def put_bytes(self, key: str, data: bytes) -> None:
        write_atomic(self._p(key), data)

    def upload(self, local_path: str | os.PathLike, key: str) -> None:
        src, dst = Path(local_path), self._p(key)
        if src.resolve() == dst.resolve():
            return
        copy_atomic(src, dst)

    def download(self, key: str, local_path: str | os.PathLike) -> Path:
        src, dst = self._p(key), Path(local_path)
        if not src.is_file():
            raise StoreError(f"{self.uri_for(key)}: no such object; rerun the stage that writes it")
        if src.resolve() != dst.resolve():
            copy_atomic(src, dst)
        return dst

    def list(self, prefix: str = "") -> list[str]:
        base = self.root / prefix.strip("/") if prefix.strip("/") else self.root
        if base.is_file():
            return [prefix.strip("/")]
        if not base.is_dir():
            # A prefix may end inside a name ("extract/a" matching "extract/ab/..."): scan the parent.
            parent = base.parent
            if not parent.is_dir():
                return []
            cands = [p for p in parent.iterdir() if p.name.startswith(base.name)]
        else:
            cands = [base]
        out: list[str] = []
        for c in cands:
            files = [c] if c.is_file() else [p for p in c.rglob("*") if p.is_file()]
            out += [str(p.relative_to(self.root)) for p in files if not p.name.endswith(PARTIAL_SUFFIX)]
        return sorted(out)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for k in keys:
            (self.root / k).unlink(missing_ok=True)
        return len(keys)

    def delete(self, key: str) -> None:
        self._p(key).unlink(missing_ok=True)

    def local_path(self, key: str) -> Path | None:
        return self._p(key)

    def create(self, key: str, data: bytes) -> bool:
        dst = self._p(key)
        tmp = dst.parent / f".{dst.name}.{os.getpid()}.{id(data)}{PARTIAL_SUFFIX}"
        write_atomic(tmp, data)
        try:
            os.link(tmp, dst)  # fails when dst exists: exactly one creator wins
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def sibling(self, name: str) -> Store:
        return LocalStore(self.root.parent / _clean_key(name), self.settings)


# --------------------------------------------------------------------------------------------------
# S3

_MiB = 1 << 20


def _s3_error(err: Exception, endpoint: str, bucket: str, what: str) -> StoreError:
    """Turn a boto3/botocore failure into a message that says what to change. Never includes secrets."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    where = f"S3 endpoint {endpoint}, bucket {bucket!r}"
    if isinstance(err, StoreError):
        return err
    if isinstance(err, EndpointConnectionError | ConnectTimeoutError | ReadTimeoutError):
        return StoreError(
            f"cannot reach {where} while {what} (retried): {redact(str(err))}; check store.endpoint "
            "and that the server is up and reachable from here",
            reason="StoreUnreachable",
        )
    if isinstance(err, NoCredentialsError):
        return StoreError(
            f"no S3 credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or store.credentialsSecret on Kubernetes), or give the pod a cloud identity",
            permanent=True,
            reason="NoCredentials",
        )
    if isinstance(err, ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchBucket",):
            return StoreError(
                f"{where}: the bucket does not exist; create it "
                f"(e.g. `aws s3 mb s3://{bucket}`) or fix store.uri",
                permanent=True,
                reason="BucketNotFound",
            )
        if code in (
            "AccessDenied",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "403",
            "Forbidden",
            "InvalidToken",
            "ExpiredToken",
        ):
            return StoreError(
                f"{where}: access denied ({code}) while {what}; check the S3 credentials "
                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or store.credentialsSecret) "
                "and the bucket policy",
                permanent=True,
                reason="AccessDenied",
            )
        if code in ("NoSuchKey", "404", "NotFound"):
            return StoreError(
                f"{where}: no such object while {what}; rerun the stage that writes it",
                reason="ObjectNotFound",
            )
        return StoreError(f"{where}: S3 error {code} while {what}: {redact(str(err))}", reason="S3Error")
    return StoreError(f"{where}: {type(err).__name__} while {what}: {redact(str(err))}")


def unreachable_endpoint(err: Exception) -> str | None:
    """Why a connection to the endpoint could not even be made: its host does not resolve, or nothing
    listens on its port; None for anything else (timeouts, HTTP errors: the server exists). A DNS answer
    of "try again" (EAI_AGAIN) is no verdict: None."""
    from botocore.exceptions import EndpointConnectionError

    if not isinstance(err, EndpointConnectionError):
        return None
    cause = str(getattr(err, "kwargs", {}).get("error", "")) or str(err)
    if "Temporary failure in name resolution" in cause or "Errno -3]" in cause:
        return None
    if "resolve" in cause or "Name or service not known" in cause or "nodename nor servname" in cause:
        return "its host name does not resolve"
    if "Connection refused" in cause or "Errno 111]" in cause:
        return "nothing listens there (connection refused)"
    return None


@dataclass(frozen=True)
class S3Endpoint:
    """Which S3 service to talk to (AWS when `endpoint` is None) and how: the settings' retries, timeouts,
    region and keys (jobs.settings; boto3's default chain without keys), unless given to make_s3_client."""

    endpoint: str | None = None
    region: str | None = None
    insecure: bool = False
    settings: Settings = field(default_factory=Settings, compare=False, repr=False)

    @classmethod
    def of(cls, spec: S3Endpoint | StoreSpec | None, settings: Settings | None = None) -> S3Endpoint:
        """The endpoint of a store spec (its S3 settings apply to every s3:// URI of the run), or AWS's;
        with `settings` (an endpoint keeps its own unless given others)."""
        if isinstance(spec, S3Endpoint):
            return spec if settings is None else replace(spec, settings=settings)
        settings = settings or Settings()
        if spec is None:
            return cls(settings=settings)
        return cls(spec.endpoint, spec.region, spec.insecure, settings)

    @property
    def label(self) -> str:
        return self.endpoint or "AWS default"


def make_s3_client(
    where: S3Endpoint | StoreSpec,
    max_attempts: int | None = None,
    *,
    credentials: tuple[str, str] | None = None,
    connect_timeout: float | None = None,
    read_timeout: float | None = None,
) -> Any:
    """The one boto3 S3 client factory: bounded retries with backoff (botocore's standard mode, exponential
    with jitter), path-style addressing for custom endpoints.

    credentials: (access key id, secret access key) instead of boto3's default chain (the operator reads
    them from the run's Secret), else the settings' (those of `where`, an S3Endpoint, or the defaults);
    kept in the client only, never logged. max_attempts / connect_timeout / read_timeout: instead of the
    settings' (the operator's are short: a pass must not block)."""
    import boto3
    from botocore.config import Config

    ep = S3Endpoint.of(where)
    s3 = ep.settings.s3
    cfg = Config(
        retries={"max_attempts": max_attempts or s3.max_attempts, "mode": "standard"},
        connect_timeout=connect_timeout or s3.connect_timeout,
        read_timeout=read_timeout or s3.read_timeout,
        s3={"addressing_style": "path"} if ep.endpoint else {},
        region_name=ep.region or s3.region or "us-east-1",
    )
    keys, token = (credentials, None) if credentials is not None else (s3.keys, s3.session_token)
    return boto3.session.Session(**_session_keys(keys, token, ep.label)).client(
        "s3", endpoint_url=ep.endpoint, config=cfg, verify=None if not ep.insecure else False
    )


def clean_key(value: str, what: str) -> str:
    """jobs.credentials.clean_key, failing as a permanent StoreError (reason InvalidCredentials)."""
    try:
        return credentials.clean_key(value, what)
    except credentials.CredentialsError as err:
        raise StoreError(str(err), permanent=True, reason="InvalidCredentials") from None


def _session_keys(keys: tuple[str, str] | None, token: str | None, label: str) -> dict[str, str]:
    """boto3 Session arguments: the keys (checked by clean_key) and a session token with them, else
    nothing (boto3's default chain: pod identity, config files)."""
    if keys is None:
        return {}
    out = {
        "aws_access_key_id": clean_key(keys[0], f"the S3 access key id for {label}"),
        "aws_secret_access_key": clean_key(keys[1], f"the S3 secret access key for {label}"),
    }
    if token:
        out["aws_session_token"] = clean_key(token, "AWS_SESSION_TOKEN")
    return out


class S3Store(Store):
    def __init__(self, where: S3Endpoint | StoreSpec, bucket: str, prefix: str, client: Any | None = None):
        from boto3.s3.transfer import TransferConfig

        self.where, self.bucket = S3Endpoint.of(where), bucket
        self.settings = self.where.settings
        self.prefix = prefix.strip("/")
        self.endpoint = self.where.label
        self.base_uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.client = client or make_s3_client(self.where)
        # Multipart above 16 MiB in 16 MiB parts, a few parts in flight: big shards and checkpoints.
        self.transfer = TransferConfig(
            multipart_threshold=16 * _MiB, multipart_chunksize=16 * _MiB, max_concurrency=4, use_threads=True
        )

    def _k(self, key: str) -> str:
        return f"{self.prefix}/{_clean_key(key)}" if self.prefix else _clean_key(key)

    def _err(self, err: Exception, what: str) -> StoreError:
        return _s3_error(err, self.endpoint, self.bucket, what)

    def check(self) -> None:
        """Fail early and clearly when the endpoint, bucket or credentials are wrong.

        An endpoint whose host does not resolve or that refuses connections is retried for the settings'
        s3.check_seconds (FUSIONRUN_S3_CHECK_SECONDS, 30: a store Service being created or restarting comes
        back in that time; the operator's are 0: a pass never waits), then permanent: before any work, it
        means the spec names a wrong endpoint. Later in a task the same error is transient (exit 1,
        retried)."""
        grace = self.settings.s3.check_seconds
        started = time.monotonic()
        while True:
            try:
                self.client.head_bucket(Bucket=self.bucket)
                return
            except Exception as err:
                why = unreachable_endpoint(err)
                if why is None:
                    raise self._check_error(err) from None
                if time.monotonic() - started >= grace:
                    raise StoreError(
                        f"S3 endpoint {self.endpoint}: {why} (checked before any work, for {grace:.0f} s); "
                        "fix store.endpoint (scheme, host, port) or start the store",
                        permanent=True,
                    ) from None
                time.sleep(min(2.0, max(0.0, grace - (time.monotonic() - started))))

    def _check_error(self, err: Exception) -> StoreError:
        from botocore.exceptions import ClientError

        if isinstance(err, ClientError) and str(err.response.get("Error", {}).get("Code")) in (
            "404",
            "NoSuchBucket",
        ):
            err.response["Error"]["Code"] = "NoSuchBucket"
        return self._err(err, "checking the bucket")

    def size(self, key: str) -> int | None:
        st = self.stat(key)
        return None if st is None else st[0]

    def stat(self, key: str) -> tuple[int, str] | None:
        """(size in bytes, ETag) of one object, or None when it does not exist."""
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._k(key))
            return int(head["ContentLength"]), _etag(head)
        except ClientError as err:
            if str(err.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._err(err, f"checking {self.uri_for(key)}") from None
        except Exception as err:
            raise self._err(err, f"checking {self.uri_for(key)}") from None

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()
        except Exception as err:
            raise self._err(err, f"reading {self.uri_for(key)}") from None

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data)
        except Exception as err:
            raise self._err(err, f"writing {self.uri_for(key)}") from None

    def upload(self, local_path: str | os.PathLike, key: str) -> None:
        try:
            self.client.upload_file(str(local_path), self.bucket, self._k(key), Config=self.transfer)
        except Exception as err:
            raise self._err(
                getattr(err, "last_exception", None) or err, f"uploading {self.uri_for(key)}"
            ) from None

    def download(self, key: str, local_path: str | os.PathLike) -> Path:
        dst = Path(local_path)
        try:
            with atomic_path(dst) as tmp:
                self.client.download_file(self.bucket, self._k(key), str(tmp), Config=self.transfer)
        except Exception as err:
            raise self._err(err, f"downloading {self.uri_for(key)}") from None
        return dst

    def _iter_objects(self, full_prefix: str) -> list[dict[str, Any]]:
        """list_objects_v2's Contents entries (Key, Size, ETag...) under a full key prefix."""
        out: list[dict[str, Any]] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full_prefix
            ):
                out += page.get("Contents", [])
        except Exception as err:
            raise self._err(err, f"listing s3://{self.bucket}/{full_prefix}") from None
        return out

    def list(self, prefix: str = "") -> list[str]:
        return [k for k, _, _ in self.list_stats(prefix)]

    def list_stats(self, prefix: str = "") -> list[tuple[str, int, str]]:
        """(key, size, ETag) of the objects under `prefix` (keys relative to the run), sorted by key."""
        p = prefix.lstrip("/")  # a string prefix of keys: "a/" lists a folder, "a" also matches "ab/..."
        full = f"{self.prefix}/{p}" if self.prefix else p
        cut = len(self.prefix) + 1 if self.prefix else 0
        return sorted((o["Key"][cut:], int(o.get("Size", 0)), _etag(o)) for o in self._iter_objects(full))

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._k(key))
        except Exception as err:
            raise self._err(err, f"deleting {self.uri_for(key)}") from None

    def create(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:  # S3 conditional write (AWS since 2024, SeaweedFS, MinIO): refused when the key exists
            self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, IfNoneMatch="*")
            return True
        except ClientError as err:
            if str(err.response.get("Error", {}).get("Code")) in ("PreconditionFailed", "412", "409"):
                return False
            raise self._err(err, f"creating {self.uri_for(key)}") from None
        except Exception as err:
            raise self._err(err, f"creating {self.uri_for(key)}") from None

    def sibling(self, name: str) -> Store:
        parent = self.prefix.rsplit("/", 1)[0] if "/" in self.prefix else ""
        prefix = f"{parent}/{_clean_key(name)}" if parent else _clean_key(name)
        return S3Store(self.where, self.bucket, prefix, client=self.client)

    def delete_prefix(self, prefix: str) -> int:
        keys = [self._k(k) for k in self.list(prefix)]
        for i in range(0, len(keys), 1000):
            batch = {"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
            try:
                self.client.delete_objects(Bucket=self.bucket, Delete=batch)
            except Exception as err:
                raise self._err(err, f"deleting under {self.uri_for(prefix)}") from None
        return len(keys)


def _etag(obj: dict[str, Any]) -> str:
    return str(obj.get("ETag", "")).strip('"')


def objects_digest(objects: Iterable[tuple[str, int, str]]) -> str:
    """sha256 over sorted (key, size, ETag) triples: changes when an object is added, removed or rewritten."""
    h = hashlib.sha256()
    for key, size, etag in sorted(objects):
        h.update(f"{key}|{size}|{etag}\n".encode())
    return h.hexdigest()


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/some/prefix -> ("bucket", "some/prefix")."""
    if not is_s3(uri):
        raise StoreError(f"not an s3:// URI: {uri!r}", permanent=True)
    bucket, _, prefix = uri[len(S3) :].partition("/")
    if not bucket:
        raise StoreError(f"{uri!r} names no bucket: use s3://BUCKET/optional/prefix", permanent=True)
    return bucket, prefix.strip("/")


def open_store(
    store_spec: StoreSpec,
    run_name: str,
    settings: Settings,
    *,
    check: bool = False,
    client: Any | None = None,
) -> Store:
    """The store of one run: keys are relative to `<store uri>/<run name>/`.

    settings: the process's (jobs.settings), which the store carries to what it opens. check: for S3,
    verify endpoint, bucket and credentials now (a clear error before any work). client: an S3 client to
    use (the operator's, with the run's keys), else one from the settings."""
    if not run_name or "/" in run_name:
        raise StoreError(f"invalid run name {run_name!r}: use the FusionRun's metadata.name", permanent=True)
    uri = store_spec.uri
    if store_spec.is_s3:
        bucket, prefix = parse_s3_uri(uri)
        where = S3Endpoint.of(store_spec, settings)
        store = S3Store(where, bucket, f"{prefix}/{run_name}" if prefix else run_name, client=client)
        if check:
            store.check()
        return store
    path = strip_file(uri)
    if not os.path.isabs(path):
        raise StoreError(
            f"store.uri {uri!r} is relative: load the spec with jobs.spec.load_fusionrun (which "
            "resolves it against the YAML file's folder) or give an absolute path",
            permanent=True,
        )
    return LocalStore(Path(path) / run_name, settings)


# --------------------------------------------------------------------------------------------------
# Models kept in S3


def endpoint_of(
    where: Store | S3Endpoint | StoreSpec | None, spec_store: StoreSpec | None = None
) -> S3Endpoint:
    """The S3 service that reaches the s3:// URIs of a run (models, corpora in other buckets): the run
    store's when the store is in S3; for a local run store, the spec's store settings (`spec_store`: AWS
    with the default credential chain unless it names an endpoint), with the store's settings."""
    if isinstance(where, S3Store):
        return where.where
    if isinstance(where, Store):
        return S3Endpoint.of(spec_store, where.settings)
    return S3Endpoint.of(where)


def download_model(where: Store | S3Endpoint | StoreSpec | None, uri: str, fresh: bool = False) -> str:
    """A local folder holding the objects under an s3:// URI, downloaded once into the cache (others pass
    through). `where`: the run store (its endpoint and credentials), an endpoint, or None for AWS's.

    fresh: make sure the cached copy is current (for corpora, which are edited in place; a model's folder
    is not expected to change): the objects are listed every time and the cache entry is keyed by their
    (key, size, ETag), so a folder whose objects changed is downloaded again, into a new entry (older
    entries stay until the cache, the settings' cache_dir, is cleared: another process may still be reading
    one)."""
    if not is_s3(uri):
        return uri
    ep = endpoint_of(where)
    bucket, prefix = parse_s3_uri(uri)
    src = S3Store(ep, bucket, prefix)
    cache_dir = ep.settings.cache_dir
    name = hashlib.sha256(f"{ep.endpoint}|{uri}".encode()).hexdigest()[:16]
    objects = src.list_stats("") if fresh else None
    if objects is not None:
        dest = cache_dir / "corpora" / f"{name}-{objects_digest(objects)[:16]}"
    else:
        dest = cache_dir / "models" / name
    done = dest.parent / f"{dest.name}.complete"  # beside, not inside: the folder holds only the model
    if done.is_file():
        return str(dest)
    # A key ending in '/' is a folder marker (S3 consoles make them): no file to download.
    keys = [k for k, _, _ in (objects if objects is not None else src.list_stats("")) if not k.endswith("/")]
    if not keys:
        if fresh:
            fix = f"{uri}: no objects under that prefix at {src.endpoint}; upload the files there or fix uri"
        else:
            fix = (
                f"model {uri}: no objects under that prefix at {src.endpoint}; upload the model folder "
                "there or fix the model's uri"
            )
        raise StoreError(fix)
    for k in keys:
        src.download(k, dest / k)
    done.write_text(uri)  # last: a half-finished download is redone, not used
    return str(dest)
