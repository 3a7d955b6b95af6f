"""The running operator: its settings, its scheduler, its metrics and store memo, and one reconciliation
pass (observe -> reconcile -> apply), the I/O around the pure engine. Built once at startup (main.py) and
handed to the kopf handlers through kopf's memo; tests build their own from an OperatorConfig.

At start (`detect_server`, from kopf's startup handler) it reads the API server's version and what a
dry-run Job keeps (capabilities.py) and puts the chosen Job shape into its config. A pass reads the run,
its Jobs and pods (kube), parses the spec and builds the DAG once (pipeline), reads the store once
(store_view, through the run's memo), reconciles, then drops invalidated manifests (store_view) and
applies the rest (kube), and updates the metrics.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import kopf

from fusionrun_operator import kube
from fusionrun_operator.capabilities import Capabilities, from_server, from_setting, parse_version, probe_job
from fusionrun_operator.config import OperatorConfig
from fusionrun_operator.effects import Effects
from fusionrun_operator.k8s_objects import LABEL_STAGE, RunRef
from fusionrun_operator.metrics import Metrics
from fusionrun_operator.observations import JobObservation, Observed, observe_jobs
from fusionrun_operator.pipeline import Pipeline, parse_pipeline
from fusionrun_operator.reconcile import reconcile
from fusionrun_operator.scheduling import Scheduler
from fusionrun_operator.store_view import (
    RunMemo,
    StoreView,
    invalidate,
    job_signatures,
    open_run_store,
    read_store_view,
    spec_digest,
    unread,
)
from jobs.spec import FusionRunSpec
from jobs.status import FusionRunStatus, parse_status

log = logging.getLogger("fusionrun_operator")


class Operator:
    def __init__(self, config: OperatorConfig):
        self.config = config
        self.scheduler = Scheduler(self.reconcile_once, config.resync_seconds, log)
        self.metrics = Metrics()
        self.metrics.set_shape(config.server)
        self._memos: dict[str, RunMemo] = {}  # by run uid (a re-created run starts afresh)
        self._uids: dict[tuple[str, str], str] = {}
        # Store warnings become Kubernetes events: one per distinct problem and run, not one per pass.
        self._store_warnings: dict[tuple[str, str], str] = {}

    # ---------------------------------------------------------------------------------------------
    # start

    def detect_server(self, logger: logging.Logger) -> Capabilities:
        """Read the API server's capabilities once and choose the Job shape (config.server)."""
        version, kept = None, None
        try:
            version = parse_version(kube.server_version())
        except Exception as err:
            logger.warning(f"cannot read the API server's version ({type(err).__name__}: {err})")
        namespace = self.config.namespaces[0] if self.config.namespaces else "default"
        try:
            kept = kube.dry_run_job(namespace, probe_job(namespace)).get("spec") or {}
        except Exception as err:  # RBAC, a missing namespace, a webhook: decide by the version alone
            logger.warning(f"dry-run probe Job in {namespace} failed ({type(err).__name__}): version only")
        server = from_setting(self.config.job_shape, from_server(version, kept))
        self.config = replace(self.config, server=server)
        self.metrics.set_shape(server)
        logger.info(server.describe())
        return server

    # ---------------------------------------------------------------------------------------------
    # one pass

    def reconcile_once(self, namespace: str, name: str, logger: logging.Logger) -> float | None:
        """One pass over one run; returns seconds until a retry is due, if any."""
        started = time.perf_counter()
        try:
            return self._pass(namespace, name, logger)
        except Exception:
            self.metrics.errors.labels("reconcile").inc()
            raise
        finally:
            self.metrics.pass_seconds.observe(time.perf_counter() - started)

    def _pass(self, namespace: str, name: str, logger: logging.Logger) -> float | None:
        fr = kube.read_run(namespace, name)
        if fr is None or fr["metadata"].get("deletionTimestamp"):
            self.forget_run(namespace, name)
            return None  # ownerReferences delete the Jobs; the delete handler cleans artifacts
        meta = fr["metadata"]
        if self._uids.setdefault((namespace, name), meta["uid"]) != meta["uid"]:
            self.forget_run(namespace, name)  # deleted and created again under the same name
            self._uids[(namespace, name)] = meta["uid"]
        jobs_raw, pods = kube.list_jobs_and_pods(namespace, name, meta["uid"])
        jobs = observe_jobs(jobs_raw, pods)
        raw_spec = fr.get("spec") or {}
        pipeline = parse_pipeline(raw_spec, self.config)
        view = unread()
        if self.config.read_store and isinstance(pipeline, Pipeline):
            view = self._read_store(pipeline, fr, jobs, logger)
        old = parse_status(fr.get("status"))
        obs = Observed(
            run=RunRef(
                name, namespace, meta["uid"], int(meta.get("generation", 1)), dict(meta.get("labels") or {})
            ),
            spec=raw_spec,
            status=old,
            jobs=jobs,
            now=datetime.now(timezone.utc),
            completed=view.completed,
            progress=view.progress,
            metrics=view.metrics,
            alignment=view.alignment,
        )
        fx = reconcile(obs, self.config, pipeline)
        if fx.invalidate:
            self._invalidate(view, pipeline, fx, meta["uid"], logger)
        self._apply(fr, fx, jobs, old)
        return fx.requeue_after

    def _apply(
        self, fr: dict[str, Any], fx: Effects, jobs: list[JobObservation], old: FusionRunStatus
    ) -> None:
        applied = kube.Applied()
        try:
            kube.apply_effects(fr, fx, applied)
        except kopf.TemporaryError:  # a create was refused: the next pass tries the same again
            self.metrics.errors.labels("create").inc()
            raise
        finally:
            stage_of = {j.name: j.stage or "unknown" for j in jobs}
            created = [o["metadata"]["labels"].get(LABEL_STAGE, "unknown") for o in applied.created_jobs]
            self.metrics.jobs(created, [stage_of.get(n, "unknown") for n in applied.deleted_jobs])
        self.metrics.tasks(old, fx.status)
        self.metrics.run_phase((fr["metadata"]["namespace"], fr["metadata"]["name"]), fx.status.phase)

    def forget_run(self, namespace: str, name: str) -> None:
        """The run is gone: out of the metrics, its memo dropped."""
        self.metrics.run_phase((namespace, name), None)
        uid = self._uids.pop((namespace, name), None)
        if uid is not None:
            self._memos.pop(uid, None)

    def _invalidate(
        self, view: StoreView, pipeline: Pipeline | Any, fx: Effects, uid: str, logger: logging.Logger
    ) -> None:
        """restartFrom: drop the tasks' manifests and what the memo remembers of them."""
        if view.store is None or not isinstance(pipeline, Pipeline):
            logger.warning(
                f"restartFrom: store not readable, cannot drop manifests of {len(fx.invalidate)} tasks"
            )
            return
        invalidate(view.store, pipeline, fx.invalidate)
        if uid in self._memos:
            self._memos[uid].forget(fx.invalidate)

    def _read_store(
        self, pipeline: Pipeline, fr: dict[str, Any], jobs: list[JobObservation], logger: logging.Logger
    ) -> StoreView:
        namespace, name, uid = fr["metadata"]["namespace"], fr["metadata"]["name"], fr["metadata"]["uid"]
        key = (namespace, name)

        def warn(err: Exception) -> None:
            self.metrics.errors.labels("store").inc()
            msg = f"store of {namespace}/{name} not readable, trusting Job states: {err}"
            if self._store_warnings.get(key) != msg:
                logger.warning(msg)
            self._store_warnings[key] = msg

        memo = None
        if self.config.store_memo:
            memo = self._memos.setdefault(uid, RunMemo()).for_spec(spec_digest(pipeline))
        ref = pipeline.spec.store.credentials_secret
        view = read_store_view(
            pipeline,
            name,
            lambda: kube.store_credentials(namespace, ref),
            on_error=warn,
            memo=memo,
            signatures=job_signatures(jobs),
            count=self.metrics.store_request,
        )
        if view.completed is not None:
            self._store_warnings.pop(key, None)
        return view

    def delete_artifacts(self, spec: FusionRunSpec, namespace: str, name: str) -> int:
        """Delete everything under the run's store prefix (spec.deleteArtifacts); returns how many objects."""
        ref = spec.store.credentials_secret
        store = open_run_store(spec, name, lambda: kube.store_credentials(namespace, ref))
        return store.delete_prefix("")
