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
from fusionrun_operator.k8s_objects import RunRef
from fusionrun_operator.observations import Observed, observe_jobs
from fusionrun_operator.pipeline import Pipeline, parse_pipeline
from fusionrun_operator.reconcile import reconcile
from fusionrun_operator.scheduling import Scheduler
from fusionrun_operator.store_view import StoreView, invalidate, open_run_store, read_store_view, unread
from jobs.spec import FusionRunSpec
from jobs.status import parse_status

log = logging.getLogger("fusionrun_operator")


class Operator:
    def __init__(self, config: OperatorConfig):
        self.config = config
        self.scheduler = Scheduler(self.reconcile_once, config.resync_seconds, log)
        # Store warnings become Kubernetes events: one per distinct problem and run, not one per pass.
        self._store_warnings: dict[tuple[str, str], str] = {}

    def reconcile_once(self, namespace: str, name: str, logger: logging.Logger) -> float | None:
        """One pass over one run; returns seconds until a retry is due, if any."""
        fr = kube.read_run(namespace, name)
        if fr is None or fr["metadata"].get("deletionTimestamp"):
            return None  # ownerReferences delete the Jobs; the delete handler cleans artifacts
        meta = fr["metadata"]
        jobs, pods = kube.list_jobs_and_pods(namespace, name, meta["uid"])
        raw_spec = fr.get("spec") or {}
        pipeline = parse_pipeline(raw_spec, self.config)
        view = unread()
        if self.config.read_store and isinstance(pipeline, Pipeline):
            view = self._read_store(pipeline, namespace, name, logger)
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
        )
        fx = reconcile(obs, self.config, pipeline)
        if fx.invalidate:
            if view.store is None or not isinstance(pipeline, Pipeline):
                logger.warning(
                    f"restartFrom: store not readable, cannot drop manifests of {len(fx.invalidate)} tasks"
                )
            else:
                invalidate(view.store, pipeline, fx.invalidate)
        kube.apply_effects(fr, fx)
        return fx.requeue_after

    def _read_store(self, pipeline: Pipeline, namespace: str, name: str, logger: logging.Logger) -> StoreView:
        key = (namespace, name)

        def warn(err: Exception) -> None:
            msg = f"store of {namespace}/{name} not readable, trusting Job states: {err}"
            if self._store_warnings.get(key) != msg:
                logger.warning(msg)
            self._store_warnings[key] = msg

        ref = pipeline.spec.store.credentials_secret
        view = read_store_view(pipeline, name, lambda: kube.store_credentials(namespace, ref), on_error=warn)
        if view.completed is not None:
            self._store_warnings.pop(key, None)
        return view

    def delete_artifacts(self, spec: FusionRunSpec, namespace: str, name: str) -> int:
        """Delete everything under the run's store prefix (spec.deleteArtifacts); returns how many objects."""
        ref = spec.store.credentials_secret
        store = open_run_store(spec, name, lambda: kube.store_credentials(namespace, ref))
        return store.delete_prefix("")
