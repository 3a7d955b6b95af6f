"""kopf handlers: I/O only. Every decision is in reconcile.py (pure); this module gathers its inputs (the
FusionRun, our Jobs and their pods, the store) and carries out its plan (create, delete, invalidate, patch
status, post events). The API calls it makes are listed in README.md (the Helm chart's RBAC follows it).

Triggers, all ending in the same `reconcile_run(namespace, name)`: FusionRun create / resume / spec update,
a resync thread every FUSIONRUN_RESYNC_SECONDS (retries after backoff, training progress, deadlines), and
any event of a Job we manage. No kopf.timer: kopf gives every object with a timer a finalizer, and the only
finalizer we want is the one for spec.deleteArtifacts. Calls
for one run are serialised (one lock per run) and coalesced: an event that arrives while that run is
being reconciled makes the running pass go round once more instead of starting a second one.
"""

from __future__ import annotations

import base64
import contextvars
import json
import logging
import threading
from datetime import datetime, timezone
from typing import Any

import kopf

from fusionrun_operator.config import OperatorConfig, from_env
from fusionrun_operator.manifests import LABEL_MANAGED_BY, LABEL_RUN, MANAGER, RunRef, effective_spec
from fusionrun_operator.reconcile import Observed, Plan, merge_patch, observe_jobs, reconcile
from jobs.plan import Stage, build_dag
from jobs.spec import API_GROUP, API_VERSION, PLURAL, FusionRunSpec, SpecError, parse_spec
from jobs.status import parse_status

CONFIG: OperatorConfig = from_env()
FINALIZER = f"{API_GROUP}/finalizer"
log = logging.getLogger("fusionrun_operator")


# --------------------------------------------------------------------------------------------------
# Kubernetes clients (the official client, in kopf's worker threads)

_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


def _api(kind: str) -> Any:
    """core | batch | custom API objects, created once; in-cluster config first, else KUBECONFIG."""
    with _clients_lock:
        if not _clients:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            _clients.update(
                core=client.CoreV1Api(), batch=client.BatchV1Api(), custom=client.CustomObjectsApi()
            )
        return _clients[kind]


def _status_code(err: Exception) -> int | None:
    return getattr(err, "status", None)


def _raw(call: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """A GET/LIST as plain camelCase JSON (no client model conversion)."""
    return json.loads(call(*args, _preload_content=False, **kwargs).data)


# --------------------------------------------------------------------------------------------------
# The store, as the operator reads it


def _store_client(spec: FusionRunSpec, namespace: str) -> Any:
    """A boto3 S3 client with the run's keys (from its Secret) and short retries: the operator must not
    hang on a store that is down. Keys stay in memory only: never logged, never in status or events."""
    import boto3
    from botocore.config import Config

    keys: dict[str, str] = {}
    ref = spec.store.credentials_secret
    if ref is not None:
        secret = _api("core").read_namespaced_secret(ref.name, namespace)
        data = secret.data or {}
        for var, key in (
            ("aws_access_key_id", ref.access_key_key),
            ("aws_secret_access_key", ref.secret_key_key),
        ):
            if key not in data:
                raise SpecError(
                    f"secret {namespace}/{ref.name} has no key {key!r} (spec.store.credentialsSecret)"
                )
            keys[var] = base64.b64decode(data[key]).decode()
    cfg = Config(
        retries={"max_attempts": 2, "mode": "standard"},
        connect_timeout=3,
        read_timeout=10,
        s3={"addressing_style": "path"} if spec.store.endpoint else {},
        region_name=spec.store.region or "us-east-1",
    )
    return boto3.session.Session(**keys).client(
        "s3", endpoint_url=spec.store.endpoint, config=cfg, verify=None if not spec.store.insecure else False
    )


def open_run_store(spec: FusionRunSpec, name: str, namespace: str) -> Any:
    from jobs.store import S3Store, open_store, parse_s3_uri

    if not spec.store.is_s3:
        return open_store(spec.store, name)
    bucket, prefix = parse_s3_uri(spec.store.uri)
    return S3Store(
        spec.store, bucket, f"{prefix}/{name}" if prefix else name, client=_store_client(spec, namespace)
    )


class ReadCache:
    """A store seen through a cache of reads for one pass: completed_tasks reads each dependency's
    manifest once per dependant, and S3 GETs are what a pass costs."""

    def __init__(self, store: Any):
        self._store = store
        self._bytes: dict[str, bytes] = {}
        self._sizes: dict[str, int | None] = {}

    def size(self, key: str) -> int | None:
        if key not in self._sizes:
            self._sizes[key] = self._store.size(key)
        return self._sizes[key]

    def exists(self, key: str) -> bool:
        return key in self._bytes or self.size(key) is not None

    def get_bytes(self, key: str) -> bytes:
        if key not in self._bytes:
            self._bytes[key] = self._store.get_bytes(key)
        return self._bytes[key]

    def __getattr__(self, name: str) -> Any:  # everything else (uri_for, local_path, ...) as it is
        return getattr(self._store, name)


def read_store_state(
    spec: FusionRunSpec, name: str, namespace: str, logger: logging.Logger
) -> tuple[Any, frozenset[str] | None, dict[str, dict[str, Any]], dict[str, Any] | None]:
    """(store, completed task ids, training progress by variant, evaluate metrics); completed is None when
    the store cannot be read (reconcile then trusts Jobs)."""
    from jobs.complete import completed_tasks

    try:
        store = open_run_store(spec, name, namespace)
        dag = build_dag(spec)
        completed = frozenset(completed_tasks(ReadCache(store), spec, dag))
        progress: dict[str, dict[str, Any]] = {}
        for t in dag:
            key = f"train/{t.variant}/progress.json"
            if t.stage is Stage.train and store.exists(key):
                progress[t.variant or "fused"] = json.loads(store.get_bytes(key))
        metrics = None
        if any(t.stage is Stage.evaluate and t.id in completed for t in dag) and store.exists(
            "evaluate/metrics.json"
        ):
            metrics = json.loads(store.get_bytes("evaluate/metrics.json"))
        _store_warnings.pop((namespace, name), None)
        return store, completed, progress, metrics
    except Exception as err:  # StoreError, a missing Secret, a malformed JSON file: run on Job states
        msg = f"store of {namespace}/{name} not readable, trusting Job states: {err}"
        # Warnings become Kubernetes events: one per distinct problem, not one per pass.
        if _store_warnings.get((namespace, name)) != msg:
            logger.warning(msg)
        _store_warnings[(namespace, name)] = msg
        return None, None, {}, None


_store_warnings: dict[tuple[str, str], str] = {}


# --------------------------------------------------------------------------------------------------
# One reconciliation pass


def _owned(objs: list[dict[str, Any]], uid: str) -> list[dict[str, Any]]:
    """Only objects owned by this incarnation of the run (a re-created run must not adopt old Jobs)."""
    return [o for o in objs if any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences") or [])]


def observe(namespace: str, name: str, logger: logging.Logger) -> tuple[dict[str, Any], Observed, Any] | None:
    from kubernetes.client.exceptions import ApiException

    try:
        fr = _raw(
            _api("custom").get_namespaced_custom_object, API_GROUP, API_VERSION, namespace, PLURAL, name
        )
    except ApiException as err:
        if err.status == 404:
            return None
        raise
    meta = fr["metadata"]
    if meta.get("deletionTimestamp"):
        return None  # ownerReferences delete the Jobs; the delete handler cleans artifacts
    selector = f"{LABEL_RUN}={name},{LABEL_MANAGED_BY}={MANAGER}"
    jobs = _owned(
        _raw(_api("batch").list_namespaced_job, namespace, label_selector=selector)["items"], meta["uid"]
    )
    pods = _raw(_api("core").list_namespaced_pod, namespace, label_selector=selector)["items"]
    run = RunRef(
        name=name,
        namespace=namespace,
        uid=meta["uid"],
        generation=int(meta.get("generation", 1)),
        labels=dict(meta.get("labels") or {}),
    )
    store, completed, progress, metrics = None, None, {}, None
    if CONFIG.read_store:
        try:
            spec = effective_spec(parse_spec(fr.get("spec") or {}), CONFIG)
        except SpecError:
            spec = None  # reconcile reports it
        if spec is not None:
            store, completed, progress, metrics = read_store_state(spec, name, namespace, logger)
    obs = Observed(
        run=run,
        spec=fr.get("spec") or {},
        status=parse_status(fr.get("status")),
        jobs=observe_jobs(jobs, pods),
        now=datetime.now(timezone.utc),
        completed=completed,
        progress=progress,
        metrics=metrics,
    )
    return fr, obs, store


def apply(fr: dict[str, Any], obs: Observed, plan: Plan, store: Any, logger: logging.Logger) -> None:
    from kubernetes.client.exceptions import ApiException

    ns, name = obs.run.namespace, obs.run.name
    if plan.invalidate:
        if store is None:
            logger.warning(
                f"restartFrom: store not readable, cannot drop manifests of {len(plan.invalidate)} tasks"
            )
        else:
            from jobs.complete import invalidate

            by_id = {t.id: t for t in build_dag(effective_spec(parse_spec(dict(obs.spec)), CONFIG))}
            for task_id in plan.invalidate:
                invalidate(store, by_id[task_id])
    for job in plan.delete_jobs:
        try:
            _api("batch").delete_namespaced_job(job, ns, propagation_policy="Background")
        except ApiException as err:
            if err.status != 404:
                raise
    failed_creates = []
    for obj in plan.create:
        try:
            if obj["kind"] == "Service":
                _api("core").create_namespaced_service(ns, obj)
            else:
                _api("batch").create_namespaced_job(ns, obj)
        except ApiException as err:
            if err.status == 409:
                continue  # created by an earlier pass: deterministic names make this success
            failed_creates.append(
                f"{obj['kind']} {obj['metadata']['name']}: {err.status} {err.reason}: {_api_message(err)}"
            )
    for ev in plan.events:
        _event(fr, ev.type, ev.reason, ev.message[:1000])
    if failed_creates:
        msg = "; ".join(failed_creates)
        _event(fr, "Warning", "CreateFailed", msg[:1000])
        # Status is not written: the next pass recomputes the same plan and tries again.
        raise kopf.TemporaryError(f"creating objects failed: {msg}", delay=30)
    patch = merge_patch(fr.get("status") or {}, plan.status.to_k8s())
    if patch:
        _api("custom").patch_namespaced_custom_object_status(
            API_GROUP, API_VERSION, ns, PLURAL, name, {"status": patch}
        )


def _event(fr: dict[str, Any], type_: str, reason: str, message: str) -> None:
    """Post a Kubernetes event for the run. kopf.event() needs kopf's posting queue in the context, which a
    pass in the resync thread does not have (LookupError): there the event goes straight to the Events API
    (same `events: create` permission), so every transition is visible in `kubectl describe`. Best effort:
    a failed post must never stop the pass from writing status."""
    try:
        kopf.event(fr, type=type_, reason=reason, message=message)
        return
    except LookupError:
        pass
    try:
        body = _event_body(fr, type_, reason, message)
        _api("core").create_namespaced_event(fr["metadata"]["namespace"], body)
    except Exception as err:  # the API may be briefly unreachable; status is what matters
        log.warning(f"event {reason} not posted: {type(err).__name__}")


def _event_body(fr: dict[str, Any], type_: str, reason: str, message: str) -> dict[str, Any]:
    """A core/v1 Event about the FusionRun, shaped like kopf's own (same source component)."""
    meta = fr["metadata"]
    now = datetime.now(timezone.utc).isoformat()
    return {
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": "FusionRun",
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
        },
        "reason": reason,
        "message": message[:1024],
        "type": type_,
        "source": {"component": "kopf"},
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
        "reportingComponent": "kopf",
        "reportingInstance": "dev",
    }


def _api_message(err: Exception) -> str:
    try:
        return json.loads(err.body).get("message", "")  # type: ignore[attr-defined]
    except Exception:
        return ""


_run_locks: dict[tuple[str, str], threading.Lock] = {}
_pending: set[tuple[str, str]] = set()
_meta_lock = threading.Lock()


def reconcile_run(namespace: str, name: str, logger: logging.Logger = log) -> float | None:
    """Reconcile one run now (or, if a pass for it is under way, make that pass repeat). Returns seconds
    until a retry is due, if any."""
    key = (namespace, name)
    with _meta_lock:
        lock = _run_locks.setdefault(key, threading.Lock())
        if lock.locked():
            _pending.add(key)
            return None
        lock.acquire()
    try:
        while True:
            requeue = _reconcile_once(namespace, name, logger)
            with _meta_lock:
                if key not in _pending:
                    break
                _pending.discard(key)
    finally:
        lock.release()
    if requeue is not None and requeue < CONFIG.resync_seconds:
        _wake_later(key, requeue)  # a retry due before the next resync: be on time for it
    return requeue


_wakeups: dict[tuple[str, str], threading.Timer] = {}


def _wake_later(key: tuple[str, str], seconds: float) -> None:
    """One pending wake-up per run (a newer one replaces it), in this context (kopf.event needs it)."""
    ctx = contextvars.copy_context()
    timer = threading.Timer(seconds + 0.2, ctx.run, args=(_wake, key))
    timer.daemon = True
    with _meta_lock:
        old = _wakeups.pop(key, None)
        if old is not None:
            old.cancel()
        _wakeups[key] = timer
    timer.start()


def _wake(key: tuple[str, str]) -> None:
    try:
        reconcile_run(*key)
    except Exception as err:
        log.warning(f"retry pass of {key[0]}/{key[1]} failed: {type(err).__name__}: {err}")


def _reconcile_once(namespace: str, name: str, logger: logging.Logger) -> float | None:
    got = observe(namespace, name, logger)
    if got is None:
        return None
    fr, obs, store = got
    plan = reconcile(obs, CONFIG)
    apply(fr, obs, plan, store, logger)
    return plan.requeue_after


# --------------------------------------------------------------------------------------------------
# kopf wiring


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Our own annotation prefix for kopf's bookkeeping, and a finalizer named after our group.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = FINALIZER
    # Watches can die silently: the server closes them after server_timeout, the client gives up after
    # client_timeout, and kopf reopens them.
    settings.watching.server_timeout = CONFIG.server_timeout
    settings.watching.client_timeout = CONFIG.client_timeout
    settings.watching.connect_timeout = 30
    if hasattr(settings.watching, "label_selectors"):  # kopf >= 1.45: filter Jobs on the server
        settings.watching.label_selectors["batch", "v1", "jobs"] = f"{LABEL_MANAGED_BY}={MANAGER}"
    settings.posting.level = logging.WARNING  # handler warnings become events; routine logs do not
    settings.peering.standalone = True  # one replica (Deployment strategy Recreate); no peering objects


@kopf.on.create(API_GROUP, API_VERSION, PLURAL)
@kopf.on.resume(API_GROUP, API_VERSION, PLURAL)
@kopf.on.update(API_GROUP, API_VERSION, PLURAL, field="spec")
def on_run_changed(name: str, namespace: str, logger: logging.Logger, **_: Any) -> None:
    reconcile_run(namespace, name, logger)


# Periodic resync without kopf.timer: kopf puts a finalizer on every object that has a timer, which
# would block deleting runs whenever the operator is down. A thread walks the known runs instead.
_known_runs: set[tuple[str, str]] = set()
_stop_resync = threading.Event()


@kopf.on.event(API_GROUP, API_VERSION, PLURAL)
def track_runs(event: dict[str, Any], body: kopf.Body, **_: Any) -> None:
    key = (body["metadata"]["namespace"], body["metadata"]["name"])
    with _meta_lock:
        if event.get("type") == "DELETED":
            _known_runs.discard(key)
        else:
            _known_runs.add(key)


def _resync_loop() -> None:
    while not _stop_resync.wait(CONFIG.resync_seconds):
        with _meta_lock:
            runs = sorted(_known_runs)
        for namespace, name in runs:
            try:
                reconcile_run(namespace, name, log)
            except Exception as err:  # one broken run must not stop the others' resync
                log.warning(f"resync of {namespace}/{name} failed: {type(err).__name__}: {err}")


@kopf.on.startup()
def start_resync(**_: Any) -> None:
    # Run in a copy of this handler's context: kopf.event() needs the operator's posting queue.
    ctx = contextvars.copy_context()
    _stop_resync.clear()
    threading.Thread(target=ctx.run, args=(_resync_loop,), name="fusionrun-resync", daemon=True).start()


@kopf.on.cleanup()
def stop_resync(**_: Any) -> None:
    _stop_resync.set()


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGER, LABEL_RUN: kopf.PRESENT})
def on_job_event(body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
    run = body["metadata"]["labels"][LABEL_RUN]
    reconcile_run(body["metadata"]["namespace"], run, logger)


@kopf.on.delete(
    API_GROUP,
    API_VERSION,
    PLURAL,
    retries=5,
    backoff=10,
    when=lambda spec, **_: bool(spec.get("deleteArtifacts")),
)
def on_run_deleted(spec: kopf.Spec, name: str, namespace: str, logger: logging.Logger, **_: Any) -> None:
    """Only for spec.deleteArtifacts: true (only those runs get our finalizer). Jobs go by ownerReferences."""
    try:
        eff = effective_spec(parse_spec(dict(spec)), CONFIG)
    except SpecError as err:
        raise kopf.PermanentError(f"cannot delete artifacts: the spec does not validate: {err}") from None
    from jobs.store import StoreError

    try:
        n = open_run_store(eff, name, namespace).delete_prefix("")
    except StoreError as err:
        raise kopf.TemporaryError(f"deleting artifacts failed: {err}", delay=10) from None
    logger.info(f"deleted {n} artifacts under {eff.store.uri.rstrip('/')}/{name}/")
