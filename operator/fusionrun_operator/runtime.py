"""The running operator: its settings, its scheduler, its metrics and store memo, and one reconciliation
pass (observe -> reconcile -> apply), the I/O around the pure engine. Built once at startup (main.py) and
handed to the kopf handlers through kopf's memo; tests build their own from an OperatorConfig.

At start (`detect_server`, from kopf's startup handler) it reads the API server's version and what a
dry-run Job keeps (capabilities.py) and puts the chosen Job shape into its config. A pass reads the run,
its Jobs and pods (kube), parses the spec and builds the DAG once (pipeline), reads the store once
(store_view, through the run's memo), claims the outputs it may make for the shared cache (claims.py),
reconciles, then drops invalidated manifests and adopts memoized tasks' entries (store_view), applies the
rest (kube), settles its claims (waking runs that wait for what it released), and updates the metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import kopf

from fusionrun_operator import kube
from fusionrun_operator.capabilities import Capabilities, from_server, from_setting, parse_version, probe_job
from fusionrun_operator.claims import Claims, RunKey
from fusionrun_operator.config import OperatorConfig
from fusionrun_operator.effects import Effects, Event
from fusionrun_operator.k8s_objects import LABEL_STAGE, RunRef, artifacts_uri
from fusionrun_operator.logs import RateLimited
from fusionrun_operator.metrics import Metrics
from fusionrun_operator.observations import Access, JobObservation, Observed, SharedOutput, observe_jobs
from fusionrun_operator.pipeline import LAST_APPLIED, Pipeline, parse_pipeline
from fusionrun_operator.policies.credentials import CredentialsCheck, check_secret, plan_store_read
from fusionrun_operator.reconcile import reconcile
from fusionrun_operator.scheduling import Scheduler
from fusionrun_operator.store_view import (
    CountingStore,
    RunMemo,
    StoreView,
    adopt,
    delete_artifacts,
    invalidate,
    job_signatures,
    open_run_store,
    read_store_view,
    spec_digest,
    unread,
)
from jobs.credentials import redact
from jobs.spec import FusionRunSpec
from jobs.status import FusionRunStatus, parse_status

log = logging.getLogger("fusionrun_operator")


class Operator:
    def __init__(self, config: OperatorConfig):
        self.config = config
        # A run's problem is a condition and an event (policies.credentials); the log says it once per run
        # and problem, not once per pass.
        self.warnings = RateLimited(log)
        self.scheduler = Scheduler(self.reconcile_once, config.resync_seconds, log, self.warnings)
        self.metrics = Metrics()
        self.metrics.set_shape(config.server)
        self._memos: dict[str, RunMemo] = {}  # by run uid (a re-created run starts afresh)
        self._uids: dict[tuple[str, str], str] = {}
        self.claims = Claims()  # one writer of a shared cache output among the runs reconciled here

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
        pipeline = parse_pipeline(raw_spec, self.config, (meta.get("annotations") or {}).get(LAST_APPLIED))
        check, view, store_access = None, unread(), None
        if isinstance(pipeline, Pipeline):
            check = self.check_credentials(pipeline.spec, namespace)
            view, store_access = self._read_store(pipeline, fr, jobs, check)
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
            credentials=check.access if check else None,
            store_access=store_access,
            shared=self._claim(view.shared, (namespace, name), meta["uid"]),
            made_from=view.made_from,
        )
        fx: Effects | None = None
        try:
            fx = reconcile(obs, self.config, pipeline)
            self._log_problems(namespace, name, obs)
            if fx.invalidate:
                self._invalidate(view, pipeline, fx, meta["uid"], logger)
            if fx.adopt:
                self._adopt(view, pipeline, fx, name, meta["uid"])
            self._apply(fr, fx, jobs, old)
        finally:  # also when a create failed: the claims of tasks the status says are Running stay
            self._settle((namespace, name), fx.status if fx is not None else old)
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

    def _claim(self, shared: Mapping[str, SharedOutput], run: RunKey, uid: str) -> dict[str, SharedOutput]:
        """Claim every output this run's ready tasks would make (claims.py); a task whose output another
        run's task claimed gets it as its producer (it waits: policies.memoize) and is looked up again."""
        out, waiting = dict(shared), []
        for task_id, found in shared.items():
            if found.hit or found.producer:
                continue
            held = self.claims.take(found.claim, run, task_id)
            if held is not None:
                out[task_id] = replace(found, producer=held.describe(run[0]))
                waiting.append(task_id)
        if waiting and uid in self._memos:
            self._memos[uid].forget_lookups(waiting)
        return out

    def _settle(self, run: RunKey, status: FusionRunStatus) -> None:
        """Keep the claims of the run's Running tasks, release the others, wake who waited for them."""
        running = {t.id for t in status.tasks if t.state == "Running"}
        for namespace, name in sorted(self.claims.settle(run, running)):
            self.scheduler.wake(namespace, name)

    def _adopt(self, view: StoreView, pipeline: Pipeline | Any, fx: Effects, run: str, uid: str) -> None:
        """Memoized tasks (policies.memoize): their manifests point at the shared entries, before anything
        else of the pass is applied. An entry gone meanwhile skips the rest (status not written): the next
        pass looks again and runs a Job."""
        assert view.store is not None and isinstance(pipeline, Pipeline)  # lookups need a read store
        ids = [a.task_id for a in fx.adopt]
        try:
            missed = adopt(CountingStore(view.store, self.metrics.store_request), pipeline, run, fx.adopt)
        finally:
            if uid in self._memos:
                self._memos[uid].forget(ids)  # complete now: their verdicts are read again
        self.metrics.memoized([pipeline.by_id[t].stage.value for t in ids if t not in missed])
        if missed:
            gone = ", ".join(missed)
            raise kopf.TemporaryError(f"shared cache entries gone before adoption: {gone}", delay=1)

    def forget_run(self, namespace: str, name: str) -> None:
        """The run is gone: out of the metrics, its memo dropped, its claims released."""
        self.metrics.run_phase((namespace, name), None)
        self.warnings.forget((namespace, name))
        for waiting in sorted(self.claims.release_run((namespace, name))):
            self.scheduler.wake(*waiting)
        uid = self._uids.pop((namespace, name), None)
        if uid is not None:
            self._memos.pop(uid, None)

    def _invalidate(
        self, view: StoreView, pipeline: Pipeline | Any, fx: Effects, uid: str, logger: logging.Logger
    ) -> None:
        """restartFrom: drop the tasks' manifests and what the memo remembers of them; without a readable
        store, say so (an event, and the log once)."""
        if view.store is None or not isinstance(pipeline, Pipeline):
            msg = f"restartFrom: the store was not read, so the manifests of {len(fx.invalidate)} tasks stay"
            fx.events.append(Event("Warning", "RestartNotApplied", msg))
            self.warnings.warning((uid, "RestartNotApplied"), msg)
            return
        invalidate(view.store, pipeline, fx.invalidate)
        if uid in self._memos:
            self._memos[uid].forget(fx.invalidate)

    def check_credentials(self, spec: FusionRunSpec, namespace: str) -> CredentialsCheck:
        """The run's credentials Secret, read once and judged (policies.credentials.check_secret)."""
        ref = spec.store.credentials_secret
        return check_secret(namespace, ref, kube.read_secret(namespace, ref.name) if ref else None)

    def _read_store(
        self, pipeline: Pipeline, fr: dict[str, Any], jobs: list[JobObservation], check: CredentialsCheck
    ) -> tuple[StoreView, Access]:
        """The store view of this pass, read only as policies.credentials.plan_store_read allows (through
        the run's memo), and the StoreReadable check it gives."""
        name, uid = fr["metadata"]["name"], fr["metadata"]["uid"]
        plan = plan_store_read(pipeline.spec.store, self.config, check)
        memo = None
        if self.config.store_memo:
            memo = self._memos.setdefault(uid, RunMemo()).for_spec(spec_digest(pipeline))
            if memo.keys != plan.keys or not plan.read:
                memo.store, memo.keys = None, plan.keys  # never a client with keys no longer allowed
        if not plan.read:
            return unread(), plan.skipped  # type: ignore[return-value]
        errors: list[Exception] = []
        view = read_store_view(
            pipeline,
            name,
            lambda: plan.keys,
            on_error=errors.append,
            memo=memo,
            signatures=job_signatures(jobs),
            count=self.metrics.store_request,
            reuse=self.config.reuse,
            recheck=self.claims.recheck((fr["metadata"]["namespace"], name)),
            settings=self.config.store_settings,
        )
        if errors:
            self.metrics.errors.labels("store").inc()
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

    def delete_artifacts(self, spec: FusionRunSpec, namespace: str, name: str) -> tuple[int, list[str]]:
        """Delete everything under the run's store prefix (spec.deleteArtifacts), after letting go of the
        shared cache entries it used (those no other run uses are deleted, store_view.delete_artifacts);
        returns (objects deleted, entries deleted). The same credentials rules as reading
        (policies.credentials); PermissionError when they forbid it."""
        check = self.check_credentials(spec, namespace)
        plan = plan_store_read(spec.store, self.config, check, for_status=False)
        if not plan.read:
            reason = plan.skipped.reason if plan.skipped else "NotAllowed"
            raise PermissionError(f"not deleting artifacts ({reason}): {check.access.message}")
        store = open_run_store(spec, name, self.config.store_settings, lambda: plan.keys)
        return delete_artifacts(CountingStore(store, self.metrics.store_request), name)
