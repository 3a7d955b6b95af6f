"""The run's Kubernetes objects: task -> Job (and, for multi-node training, a headless Service); pure, no API
calls. (Not to be confused with jobs/complete.py, the store's task completion records.)

Names are deterministic (`<run>-<task id>-<attempt>`, `-r<rank>` for multi-node ranks) and shortened with
a hash to <= 63 characters, so that a restarted operator or a duplicate event computes the same name and
gets 409 AlreadyExists instead of a second Job. Labels let the operator find its Jobs again:
app.kubernetes.io/managed-by, fusionrun.dev/{run,stage,task,attempt,rank}.

Pods run `python -m jobs <Task.args()>` with FUSIONRUN_SPEC (the spec as JSON: it holds only the *name* of
the credentials Secret, never its values), FUSIONRUN_NAME, and the S3 keys through secretKeyRef. Multi-node
training is one Job per node rank (works on every Kubernetes version; 1.20 has no Indexed Jobs), pods
with hostname `<run>-<task>-<rank>` under a headless Service `<run>-<task>`, so that rank 0 has the stable
address `<run>-train-0.<run>-train.<namespace>.svc` (MASTER_ADDR) before any pod is ready.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import kopf

from fusionrun_operator.config import OperatorConfig
from jobs.spec import API_GROUP, API_VERSION, KIND, FusionRunSpec, StageResources, StoreSpec

if TYPE_CHECKING:  # only its attributes are used here (id, stage, distributed, args)
    from jobs.plan import Task

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "fusionrun-operator"
LABEL_RUN = f"{API_GROUP}/run"
LABEL_STAGE = f"{API_GROUP}/stage"
LABEL_TASK = f"{API_GROUP}/task"
LABEL_ATTEMPT = f"{API_GROUP}/attempt"
LABEL_RANK = f"{API_GROUP}/rank"
ANNOTATION_GENERATION = f"{API_GROUP}/generation"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
MAX_NAME = 63
CONTAINER = "stage"


@dataclass(frozen=True)
class RunRef:
    """The FusionRun that owns the objects (what kopf.adopt needs, plus the generation)."""

    name: str
    namespace: str
    uid: str
    generation: int = 1
    labels: dict[str, str] = field(default_factory=dict)

    def owner_body(self) -> dict[str, Any]:
        return {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": KIND,
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "uid": self.uid,
                "labels": dict(self.labels),
            },
        }


def k8s_name(*parts: str | int) -> str:
    """Parts joined by '-', a DNS-1123 label of <= 63 chars; longer names keep a readable prefix and end
    with 10 hex digits of the full name's sha256 (distinct long names stay distinct)."""
    full = "-".join(str(p) for p in parts)
    if len(full) <= MAX_NAME:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:10]
    return f"{full[: MAX_NAME - 11].rstrip('-')}-{digest}"


def job_name(run: str, task_id: str, attempt: int, rank: int | None = None) -> str:
    return k8s_name(run, task_id, attempt) if rank is None else k8s_name(run, task_id, attempt, f"r{rank}")


def service_name(run: str, task_id: str) -> str:
    return k8s_name(run, task_id)


def pod_hostname(run: str, task_id: str, rank: int) -> str:
    return k8s_name(run, task_id, rank)


def is_relative_local(uri: str) -> bool:
    return bool(re.match(r"^(file://)?\.\.?/", uri))


def effective_spec(spec: FusionRunSpec, config: OperatorConfig) -> FusionRunSpec:
    """The spec the Jobs run with: a relative local store (the spec default, meaningless in a cluster)
    becomes the operator's default store when one is configured."""
    if not (config.default_store_uri and is_relative_local(spec.store.uri)):
        return spec
    secret = {"name": config.default_store_secret} if config.default_store_secret else None
    store = StoreSpec.model_validate(
        {
            "uri": config.default_store_uri,
            "endpoint": config.default_store_endpoint,
            "region": config.default_store_region,
            "insecure": config.default_store_insecure,
            "credentialsSecret": secret,
        }
    )
    return spec.model_copy(update={"store": store})


def artifacts_uri(spec: FusionRunSpec, run: str) -> str:
    return f"{spec.store.uri.rstrip('/')}/{run}/"


def labels_for(run: str, task: Task, attempt: int, rank: int | None = None) -> dict[str, str]:
    out = {
        LABEL_MANAGED_BY: MANAGER,
        LABEL_RUN: run,
        LABEL_STAGE: task.stage.value,
        LABEL_TASK: task.id,
        LABEL_ATTEMPT: str(attempt),
    }
    if rank is not None:
        out[LABEL_RANK] = str(rank)
    return out


def _resources(res: StageResources) -> dict[str, Any]:
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if res.cpu:
        requests["cpu"] = res.cpu
    if res.memory:
        requests["memory"] = limits["memory"] = res.memory  # memory is not compressible: limit = request
    if res.gpus:
        requests[res.gpu_resource] = limits[res.gpu_resource] = str(res.gpus)  # extended: both, equal
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def stage_resources(spec: FusionRunSpec, stage: str, config: OperatorConfig) -> StageResources:
    """The run's spec.resources.<stage>, with every field it leaves empty (cpu/memory/gpus unset, the
    default gpuResource, no nodeSelector, no tolerations) taken from the operator's stage defaults. gpus has
    no CRD default, so an explicit `gpus: 0` (no GPU, whatever the default) differs from leaving it out."""
    own: StageResources = getattr(spec.resources, stage)
    default = config.stage_defaults.get(stage)
    if default is None:
        return own
    blank = StageResources()
    merged = {
        name: getattr(default if getattr(own, name) == getattr(blank, name) else own, name)
        for name in StageResources.model_fields
    }
    return StageResources.model_validate(merged)


def _tolerations(res: StageResources) -> list[dict[str, str]]:
    return [t.model_dump(exclude_none=True) for t in res.tolerations]


def _env(run: RunRef, spec: FusionRunSpec, task: Task, attempt: int) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "FUSIONRUN_NAME", "value": run.name},
        # The whole spec, secret-free by construction: credentialsSecret holds names, not keys.
        {"name": "FUSIONRUN_SPEC", "value": spec.model_dump_json(by_alias=True, exclude_none=True)},
        {"name": "FUSIONRUN_TASK", "value": task.id},
        {"name": "FUSIONRUN_ATTEMPT", "value": str(attempt)},
        {"name": "FUSIONRUN_CACHE", "value": "/scratch/cache"},
        {"name": "TMPDIR", "value": "/scratch"},  # the emptyDir itself (a subfolder would not exist)
        {"name": "HOME", "value": "/scratch"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    secret = spec.store.credentials_secret
    if secret is not None:
        for var, key in (
            ("AWS_ACCESS_KEY_ID", secret.access_key_key),
            ("AWS_SECRET_ACCESS_KEY", secret.secret_key_key),
        ):
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": key}}})
    return env


def _rendezvous_env(
    run: RunRef, spec: FusionRunSpec, task: Task, rank: int, config: OperatorConfig
) -> list[dict[str, str]]:
    nodes, procs = spec.training.nodes, spec.training.procs_per_node
    if nodes > 1:
        master = f"{pod_hostname(run.name, task.id, 0)}.{service_name(run.name, task.id)}.{run.namespace}.svc"
    else:
        master = "127.0.0.1"  # one node: no Service, no DNS
    env = {
        "MASTER_ADDR": master,
        "MASTER_PORT": str(config.master_port),
        "WORLD_SIZE": str(nodes * procs),
        "NODE_RANK": str(rank),
        "NNODES": str(nodes),
        "NPROC_PER_NODE": str(procs),
    }
    if procs == 1:  # one process per pod runs the trainer directly: it needs its own RANK and LOCAL_RANK
        env |= {"RANK": str(rank), "LOCAL_RANK": "0"}
    return [{"name": k, "value": v} for k, v in env.items()]


def _command(spec: FusionRunSpec, task: Task, rank: int | None, config: OperatorConfig) -> list[str]:
    if task.distributed and spec.training.procs_per_node > 1:
        # Several processes per pod (one per GPU): torchrun starts them with RANK/LOCAL_RANK set.
        t = spec.training
        return [
            "torchrun",
            f"--nnodes={t.nodes}",
            f"--nproc-per-node={t.procs_per_node}",
            f"--node-rank={rank or 0}",
            "--master-addr=$(MASTER_ADDR)",
            f"--master-port={config.master_port}",
            "-m",
            "jobs",
            *task.args(),
        ]
    return ["python", "-m", "jobs", *task.args()]


def _pod_spec(
    run: RunRef, spec: FusionRunSpec, task: Task, attempt: int, config: OperatorConfig, rank: int | None
) -> dict[str, Any]:
    """The pod of one task attempt (one node rank of it): its stage container, scratch and /dev/shm
    volumes, the hardened security context, scheduling fields, and stable DNS names for multi-node ranks."""
    res = stage_resources(spec, task.stage.value, config)
    multi_node = task.distributed and spec.training.nodes > 1
    env = _env(run, spec, task, attempt)
    if task.distributed:
        env += _rendezvous_env(run, spec, task, rank or 0, config)
    volumes = [{"name": "scratch", "emptyDir": {}}]
    mounts = [{"name": "scratch", "mountPath": "/scratch"}]
    if task.stage.value in ("extract", "train", "evaluate"):  # torch workers and NCCL need a real /dev/shm
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or config.job_image,
        "imagePullPolicy": spec.image_pull_policy or config.image_pull_policy,
        "command": _command(spec, task, rank, config),
        "env": env,
        "resources": _resources(res),
        "volumeMounts": mounts,
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    if multi_node:
        container["ports"] = [{"name": "rendezvous", "containerPort": config.master_port}]
    pod: dict[str, Any] = {
        "restartPolicy": "Never",  # the operator retries, with backoff and an attempt counter
        "containers": [container],
        "volumes": volumes,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": config.run_as_user,
            "runAsGroup": config.run_as_user,
            "fsGroup": config.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "enableServiceLinks": False,
    }
    if res.node_selector:
        pod["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod["tolerations"] = _tolerations(res)
    if spec.service_account_name or config.job_service_account:
        pod["serviceAccountName"] = spec.service_account_name or config.job_service_account
    if spec.priority_class_name:
        pod["priorityClassName"] = spec.priority_class_name
    if multi_node:
        pod["hostname"] = pod_hostname(run.name, task.id, rank or 0)
        pod["subdomain"] = service_name(run.name, task.id)
    return pod


def job_manifest(
    run: RunRef,
    spec: FusionRunSpec,
    task: Task,
    attempt: int,
    config: OperatorConfig,
    rank: int | None = None,
    active_deadline_seconds: int | None = None,
) -> dict[str, Any]:
    """The batch/v1 Job of one task attempt (one node rank of it for multi-node training).

    rank: None for every task but training; training gets 0..nodes-1. active_deadline_seconds: what is
    left of the run's deadline (the Job must not outlive the run)."""
    multi_node = task.distributed and spec.training.nodes > 1
    labels = labels_for(run.name, task, attempt, rank if task.distributed else None)
    job_labels = dict(labels)
    if spec.queue_name:
        job_labels[KUEUE_QUEUE_LABEL] = spec.queue_name
    job_spec: dict[str, Any] = {
        "backoffLimit": 0,
        "completions": 1,
        "parallelism": 1,
        "template": {
            "metadata": {"labels": labels},
            "spec": _pod_spec(run, spec, task, attempt, config, rank),
        },
    }
    if active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = max(1, int(active_deadline_seconds))
    if spec.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(run.name, task.id, attempt, rank if multi_node else None),
            "namespace": run.namespace,
            "labels": job_labels,
            "annotations": {ANNOTATION_GENERATION: str(run.generation)},
        },
        "spec": job_spec,
    }
    kopf.adopt(job, owner=run.owner_body())  # ownerReferences: deleting the run deletes its Jobs
    return job


def service_manifest(run: RunRef, task: Task, config: OperatorConfig) -> dict[str, Any]:
    """Headless Service giving the ranks of a multi-node task stable DNS names (rank 0 = MASTER_ADDR)."""
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(run.name, task.id),
            "namespace": run.namespace,
            "labels": {
                LABEL_MANAGED_BY: MANAGER,
                LABEL_RUN: run.name,
                LABEL_STAGE: task.stage.value,
                LABEL_TASK: task.id,
            },
        },
        "spec": {
            "clusterIP": "None",
            # Ranks must resolve rank 0 before anything is "ready": stage pods have no readiness probes.
            "publishNotReadyAddresses": True,
            "selector": {LABEL_RUN: run.name, LABEL_TASK: task.id},
            "ports": [{"name": "rendezvous", "port": config.master_port, "targetPort": config.master_port}],
        },
    }
    kopf.adopt(svc, owner=run.owner_body())
    return svc


def task_manifests(
    run: RunRef,
    spec: FusionRunSpec,
    task: Task,
    attempt: int,
    config: OperatorConfig,
    active_deadline_seconds: int | None = None,
) -> list[dict[str, Any]]:
    """Everything one attempt of a task needs: one Job; for multi-node training the Service and one Job
    per node rank (all-or-nothing: the operator replaces the whole group when one rank fails)."""
    if not task.distributed:
        return [job_manifest(run, spec, task, attempt, config, None, active_deadline_seconds)]
    nodes = spec.training.nodes
    jobs = [job_manifest(run, spec, task, attempt, config, r, active_deadline_seconds) for r in range(nodes)]
    return [service_manifest(run, task, config), *jobs] if nodes > 1 else jobs


def ranks_of(spec: FusionRunSpec, task: Task) -> int:
    """How many Jobs one attempt of the task is: the node count for multi-node training, else 1."""
    return spec.training.nodes if task.distributed and spec.training.nodes > 1 else 1


def task_job_names(run: str, spec: FusionRunSpec, task: Task, attempt: int) -> list[str]:
    if ranks_of(spec, task) > 1:
        return [job_name(run, task.id, attempt, r) for r in range(spec.training.nodes)]
    return [job_name(run, task.id, attempt)]
