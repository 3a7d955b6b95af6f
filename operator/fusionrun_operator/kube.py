"""The Kubernetes API as the operator uses it: lazy clients, raw GET/LIST of a run and its objects, the
Secret a run names, and carrying out a pass's effects (delete, create, events, status).

Every API call of the operator is an `_api(kind).<method>(...)` here: tests/test_chart.py derives the Helm
chart's RBAC from these calls (README.md lists them).
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import kopf

from fusionrun_operator.effects import Effects
from fusionrun_operator.k8s_objects import LABEL_MANAGED_BY, LABEL_RUN, MANAGER
from fusionrun_operator.observations import SecretRead
from jobs.spec import API_GROUP, API_VERSION, PLURAL

log = logging.getLogger("fusionrun_operator")

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
                core=client.CoreV1Api(),
                batch=client.BatchV1Api(),
                custom=client.CustomObjectsApi(),
                version=client.VersionApi(),
            )
        return _clients[kind]


def _raw(call: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """A GET/LIST as plain camelCase JSON (no client model conversion)."""
    return json.loads(call(*args, _preload_content=False, **kwargs).data)


# --------------------------------------------------------------------------------------------------
# Reading


def read_run(namespace: str, name: str) -> dict[str, Any] | None:
    """The FusionRun, or None when it is gone."""
    from kubernetes.client.exceptions import ApiException

    try:
        return _raw(
            _api("custom").get_namespaced_custom_object, API_GROUP, API_VERSION, namespace, PLURAL, name
        )
    except ApiException as err:
        if err.status == 404:
            return None
        raise


def _owned(objs: list[dict[str, Any]], uid: str) -> list[dict[str, Any]]:
    """Only objects owned by this incarnation of the run (a re-created run must not adopt old Jobs)."""
    return [o for o in objs if any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences") or [])]


def list_jobs_and_pods(
    namespace: str, run: str, uid: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The run's Jobs (owned by run uid `uid`) and the pods of the run's Jobs, by our labels."""
    selector = f"{LABEL_RUN}={run},{LABEL_MANAGED_BY}={MANAGER}"
    jobs = _raw(_api("batch").list_namespaced_job, namespace, label_selector=selector)["items"]
    pods = _raw(_api("core").list_namespaced_pod, namespace, label_selector=selector)["items"]
    return _owned(jobs, uid), pods


def server_version() -> dict[str, Any]:
    """GET /version (a non-resource URL every authenticated client may read)."""
    return _raw(_api("version").get_code)


def dry_run_job(namespace: str, job: dict[str, Any]) -> dict[str, Any]:
    """Create `job` with dryRun=All: nothing is stored; the answer shows the Job as the server would keep
    it (fields it does not know, or whose feature gate is off, are gone)."""
    return _raw(_api("batch").create_namespaced_job, namespace, job, dry_run="All")


def read_secret(namespace: str, name: str) -> SecretRead:
    """The Secret a run names, as policies.credentials judges it: its labels and data, or the HTTP status
    that kept it from us (404 not found, 403 not allowed). The data is used, never logged."""
    from kubernetes.client.exceptions import ApiException

    try:
        raw = _raw(_api("core").read_namespaced_secret, name, namespace)
    except ApiException as err:
        return SecretRead(int(err.status or 0))
    meta = raw.get("metadata") or {}
    return SecretRead(200, dict(meta.get("labels") or {}), dict(raw.get("data") or {}))


# --------------------------------------------------------------------------------------------------
# Writing


@dataclass
class Applied:
    """What a pass changed in the cluster (for the metrics): Jobs created and deleted."""

    created_jobs: list[dict[str, Any]] = field(default_factory=list)
    deleted_jobs: list[str] = field(default_factory=list)


def apply_effects(fr: dict[str, Any], fx: Effects, applied: Applied | None = None) -> Applied:
    """Delete, create (409 = an earlier pass did), post events, patch status. When a create fails, status
    is not written: the next pass recomputes the same effects and tries again. `applied` (returned)
    records what was done, also when a failed create raises."""
    from kubernetes.client.exceptions import ApiException

    done = applied if applied is not None else Applied()
    ns, name = fr["metadata"]["namespace"], fr["metadata"]["name"]
    for job in fx.delete_jobs:
        try:
            _api("batch").delete_namespaced_job(job, ns, propagation_policy="Background")
            done.deleted_jobs.append(job)
        except ApiException as err:
            if err.status != 404:
                raise
    failed_creates = []
    for obj in fx.create:
        try:
            if obj["kind"] == "Service":
                _api("core").create_namespaced_service(ns, obj)
            else:
                _api("batch").create_namespaced_job(ns, obj)
                done.created_jobs.append(obj)
        except ApiException as err:
            if err.status == 409:
                continue  # created by an earlier pass: deterministic names make this success
            failed_creates.append(
                f"{obj['kind']} {obj['metadata']['name']}: {err.status} {err.reason}: {_api_message(err)}"
            )
    for ev in fx.events:
        post_event(fr, ev.type, ev.reason, ev.message[:1000])
    if failed_creates:
        msg = "; ".join(failed_creates)
        post_event(fr, "Warning", "CreateFailed", msg[:1000])
        raise kopf.TemporaryError(f"creating objects failed: {msg}", delay=30)
    patch = merge_patch(fr.get("status") or {}, fx.status.to_k8s())
    if patch:
        _api("custom").patch_namespaced_custom_object_status(
            API_GROUP, API_VERSION, ns, PLURAL, name, {"status": patch}
        )
    return done


def merge_patch(old: Any, new: Any) -> Any:
    """The JSON merge patch (RFC 7386) that turns `old` into `new`: keys gone from `new` become null
    (a merge patch of just `new` would leave them behind). Lists are replaced whole. Pure."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    patch: dict[str, Any] = {}
    for k in old.keys() - new.keys():
        patch[k] = None
    for k, v in new.items():
        if k not in old:
            patch[k] = v
        elif old[k] != v:
            patch[k] = merge_patch(old[k], v) if isinstance(v, dict) and isinstance(old[k], dict) else v
    return patch


def post_event(fr: dict[str, Any], type_: str, reason: str, message: str) -> None:
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
        body = event_body(fr, type_, reason, message)
        _api("core").create_namespaced_event(fr["metadata"]["namespace"], body)
    except Exception as err:  # the API may be briefly unreachable; status is what matters
        log.warning(f"event {reason} not posted: {type(err).__name__}")


def event_body(fr: dict[str, Any], type_: str, reason: str, message: str) -> dict[str, Any]:
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
