"""The running operator: its settings, its scheduler, and one reconciliation pass (observe -> reconcile ->
apply), the I/O around the pure engine. Built once at startup (main.py) and handed to the kopf handlers
through kopf's memo; tests build their own from an OperatorConfig.

A pass reads the run, its Jobs and pods (kube), parses the spec and builds the DAG once (pipeline), reads
the store once (store_view), reconciles, then drops invalidated manifests (store_view) and applies the
rest (kube).
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

from fusionrun_operator import kube
from fusionrun_operator.config import OperatorConfig
from fusionrun_operator.effects import Effects, Event
from fusionrun_operator.k8s_objects import RunRef, artifacts_uri
from fusionrun_operator.logs import RateLimited
from fusionrun_operator.observations import Access, Observed, observe_jobs
from fusionrun_operator.pipeline import LAST_APPLIED, InvalidSpec, Pipeline, parse_pipeline
from fusionrun_operator.policies.credentials import CredentialsCheck, check_secret, plan_store_read
from fusionrun_operator.reconcile import reconcile
from fusionrun_operator.scheduling import Scheduler
from fusionrun_operator.store_view import StoreView, invalidate, open_run_store, read_store_view, unread
from jobs.credentials import redact
from jobs.spec import FusionRunSpec
from jobs.status import parse_status

log = logging.getLogger("fusionrun_operator")


class Operator:
    def __init__(self, config: OperatorConfig):
        self.config = config
        # A run's problem is a condition and an event (policies.credentials); the log says it once per run
        # and problem, not once per pass.
        self.warnings = RateLimited(log)
        self.scheduler = Scheduler(self.reconcile_once, config.resync_seconds, log, self.warnings)

    def reconcile_once(self, namespace: str, name: str, logger: logging.Logger) -> float | None:
        """One pass over one run; returns seconds until a retry is due, if any."""
        fr = kube.read_run(namespace, name)
        if fr is None or fr["metadata"].get("deletionTimestamp"):
            self.warnings.forget((namespace, name))
            return None  # ownerReferences delete the Jobs; the delete handler cleans artifacts
        meta = fr["metadata"]
        jobs, pods = kube.list_jobs_and_pods(namespace, name, meta["uid"])
        raw_spec = fr.get("spec") or {}
        applied = (meta.get("annotations") or {}).get(LAST_APPLIED)
        pipeline = parse_pipeline(raw_spec, self.config, applied)
        check, view, store_access = None, unread(), None
        if isinstance(pipeline, Pipeline):
            check = self.check_credentials(pipeline.spec, namespace)
            view, store_access = self._read_store(pipeline, name, check)
        obs = Observed(
            run=RunRef(
                name=name,
                namespace=namespace,
                uid=meta["uid"],
                generation=int(meta.get("generation", 1)),
                labels=dict(meta.get("labels") or {}),
            ),
            spec=raw_spec,
            status=parse_status(fr.get("status")),
            jobs=observe_jobs(jobs, pods),
            now=datetime.now(timezone.utc),
            completed=view.completed,
            progress=view.progress,
            metrics=view.metrics,
            alignment=view.alignment,
            credentials=check.access if check else None,
            store_access=store_access,
        )
        fx = reconcile(obs, self.config, pipeline)
        self._log_problems(namespace, name, obs)
        if fx.invalidate:
            self._invalidate(fx, view, pipeline, f"{namespace}/{name}")
        kube.apply_effects(fr, fx)
        return fx.requeue_after

    def _invalidate(self, fx: Effects, view: StoreView, pipeline: Pipeline | InvalidSpec, run: str) -> None:
        """restartFrom: drop the manifests reconcile named; without a readable store, say so."""
        if view.store is not None and isinstance(pipeline, Pipeline):
            invalidate(view.store, pipeline, fx.invalidate)
            return
        msg = f"restartFrom: the store was not read, so the manifests of {len(fx.invalidate)} tasks stay"
        fx.events.append(Event("Warning", "RestartNotApplied", msg))
        self.warnings.warning((*run.split("/"), "RestartNotApplied"), f"{run}: {msg}")

    def check_credentials(self, spec: FusionRunSpec, namespace: str) -> CredentialsCheck:
        """The run's credentials Secret, read once and judged (policies.credentials.check_secret)."""
        ref = spec.store.credentials_secret
        return check_secret(namespace, ref, kube.read_secret(namespace, ref.name) if ref else None)

    def _read_store(self, pipeline: Pipeline, name: str, check: CredentialsCheck) -> tuple[StoreView, Access]:
        """The store view of this pass, read only as policies.credentials.plan_store_read allows, and the
        StoreReadable check it gives."""
        plan = plan_store_read(pipeline.spec.store, self.config, check)
        if not plan.read:
            return unread(), plan.skipped  # type: ignore[return-value]
        errors: list[Exception] = []
        view = read_store_view(pipeline, name, lambda: plan.keys, on_error=errors.append)
        if errors:
            err = errors[0]
            reason = getattr(err, "reason", None) or (
                "StoreDataInvalid" if isinstance(err, ValueError) else "StoreError"
            )
            message = redact(f"store not readable, status from Jobs only: {err}", plan.keys or ())
            return view, Access(False, reason, message[:1000])
        return view, Access(True, "StoreRead", f"read {artifacts_uri(pipeline.spec, name)}")

    def _log_problems(self, namespace: str, name: str, obs: Observed) -> None:
        for type_, access in (("credentials", obs.credentials), ("store", obs.store_access)):
            if access is not None and access.ok is False:
                msg = f"{namespace}/{name}: {access.reason}: {access.message}"
                self.warnings.warning((namespace, name, type_, access.reason), msg)
            elif access is not None:
                self.warnings.forget((namespace, name, type_))

    def delete_artifacts(self, spec: FusionRunSpec, namespace: str, name: str) -> int:
        """Delete everything under the run's store prefix (spec.deleteArtifacts); returns how many objects.
        The same credentials rules as reading (policies.credentials); PermissionError when they forbid it."""
        check = self.check_credentials(spec, namespace)
        plan = plan_store_read(spec.store, self.config, check, for_status=False)
        if not plan.read:
            reason = plan.skipped.reason if plan.skipped else "NotAllowed"
            raise PermissionError(f"not deleting artifacts ({reason}): {check.access.message}")
        store = open_run_store(spec, name, lambda: plan.keys)
        return store.delete_prefix("")
