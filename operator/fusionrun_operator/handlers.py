"""kopf wiring only: which events trigger a pass, and kopf's settings. Every handler reaches the running
operator (runtime.Operator: settings, scheduler, the pass) through kopf's memo, set by main.py.

Triggers, all ending in the same Scheduler.reconcile_run(namespace, name): FusionRun create / resume / spec
update, any event of a Job we manage, and the scheduler's resync thread (see scheduling.py).
The API calls the operator makes are in kube.py and listed in README.md (the Helm chart's RBAC follows it).
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from fusionrun_operator.k8s_objects import LABEL_MANAGED_BY, LABEL_RUN, MANAGER
from fusionrun_operator.pipeline import InvalidSpec, parse_pipeline
from fusionrun_operator.runtime import Operator
from jobs.spec import API_GROUP, API_VERSION, PLURAL
from jobs.store import StoreError

FINALIZER = f"{API_GROUP}/finalizer"


def _operator(memo: kopf.Memo) -> Operator:
    return memo["operator"]


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config = _operator(memo).config
    # Our own annotation prefix for kopf's bookkeeping, and a finalizer named after our group.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = FINALIZER
    # Watches can die silently: the server closes them after server_timeout, the client gives up after
    # client_timeout, and kopf reopens them.
    settings.watching.server_timeout = config.server_timeout
    settings.watching.client_timeout = config.client_timeout
    settings.watching.connect_timeout = 30
    if hasattr(settings.watching, "label_selectors"):  # kopf >= 1.45: filter Jobs on the server
        settings.watching.label_selectors["batch", "v1", "jobs"] = f"{LABEL_MANAGED_BY}={MANAGER}"
    # kopf's own handler failures become events; problems a user must act on are posted by the operator
    # itself (conditions and events of policies.credentials / invalid_spec), not through log records.
    settings.posting.level = logging.WARNING
    settings.peering.standalone = True  # one replica (Deployment strategy Recreate); no peering objects


@kopf.on.startup()
def detect_server(memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Before any run is reconciled: the API server's capabilities decide the Job shape."""
    _operator(memo).detect_server(logger)


@kopf.on.startup()
def start_resync(memo: kopf.Memo, **_: Any) -> None:
    _operator(memo).scheduler.start_resync()  # in this handler's context: kopf.event() needs it


@kopf.on.cleanup()
def stop_resync(memo: kopf.Memo, **_: Any) -> None:
    _operator(memo).scheduler.stop_resync()


@kopf.on.create(API_GROUP, API_VERSION, PLURAL)
@kopf.on.resume(API_GROUP, API_VERSION, PLURAL)
@kopf.on.update(API_GROUP, API_VERSION, PLURAL, field="spec")
def on_run_changed(name: str, namespace: str, logger: logging.Logger, memo: kopf.Memo, **_: Any) -> None:
    _operator(memo).scheduler.reconcile_run(namespace, name, logger)


@kopf.on.event(API_GROUP, API_VERSION, PLURAL)
def track_runs(event: dict[str, Any], body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    meta = body["metadata"]
    deleted = event.get("type") == "DELETED"
    _operator(memo).scheduler.track(meta["namespace"], meta["name"], deleted=deleted)
    if deleted:
        _operator(memo).forget_run(meta["namespace"], meta["name"])


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGER, LABEL_RUN: kopf.PRESENT})
def on_job_event(body: kopf.Body, logger: logging.Logger, memo: kopf.Memo, **_: Any) -> None:
    run = body["metadata"]["labels"][LABEL_RUN]
    _operator(memo).scheduler.reconcile_run(body["metadata"]["namespace"], run, logger)


@kopf.on.delete(
    API_GROUP,
    API_VERSION,
    PLURAL,
    retries=5,
    backoff=10,
    when=lambda spec, **_: bool(spec.get("deleteArtifacts")),
)
def on_run_deleted(
    spec: kopf.Spec, name: str, namespace: str, logger: logging.Logger, memo: kopf.Memo, **_: Any
) -> None:
    """Only for spec.deleteArtifacts: true (only those runs get our finalizer). Jobs go by ownerReferences;
    shared cache entries the run used go only when no other run uses them (jobs.cache.release_run)."""
    operator = _operator(memo)
    pipeline = parse_pipeline(dict(spec), operator.config)
    if isinstance(pipeline, InvalidSpec):
        raise kopf.PermanentError(f"cannot delete artifacts: the spec does not validate: {pipeline.message}")

    try:
        n, entries = operator.delete_artifacts(pipeline.spec, namespace, name)
    except PermissionError as err:  # credentials the operator may not use (policies.credentials)
        raise kopf.PermanentError(str(err)) from None
    except StoreError as err:
        raise kopf.TemporaryError(f"deleting artifacts failed: {err}", delay=10) from None
    uri = pipeline.spec.store.uri.rstrip("/")
    logger.info(
        f"deleted {n} artifacts under {uri}/{name}/ and {len(entries)} shared cache entries no other run "
        "uses (those other runs use stay)"
    )
