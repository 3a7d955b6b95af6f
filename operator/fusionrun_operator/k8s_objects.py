"""The run's Kubernetes objects: task -> Job (and, for multi-node training, a headless Service); pure, no API
calls. (Not to be confused with jobs/complete.py, the store's task completion records.)

Names are deterministic (`<run>-<task id>-<attempt>`, `-r<rank>` for multi-node ranks) and shortened with
a hash to <= 63 characters, so that a restarted operator or a duplicate event computes the same name and
gets 409 AlreadyExists instead of a second Job. Labels let the operator find its Jobs again:
app.kubernetes.io/managed-by, fusionrun.dev/{run,stage,task,attempt,rank}.

Pods run `python -m jobs <Task.args()>` with FUSIONRUN_SPEC (the spec as JSON: it holds only the *name* of
the credentials Secret, never its values), FUSIONRUN_NAME, and the S3 keys through secretKeyRef. Here is the
shape every server runs (one Job per task); in it multi-node training is one Job per node rank, pods with
hostname `<run>-<task>-<rank>` under a headless Service `<run>-<task>`, so that rank 0 has the stable
address `<run>-train-0.<run>-train.<namespace>.svc` (MASTER_ADDR) before any pod is ready. The Indexed
shapes (one Job per training attempt, one per shard group) are in indexed_jobs.py and share the pod here.

Every stage container leaves its last error line in /dev/termination-log (FUSIONRUN_TERMINATION_LOG), with
terminationMessagePolicy FallbackToLogsOnError (the log's tail when it wrote none): the operator quotes it.
Where the server has them (config.server), Jobs get a podFailurePolicy (exit code 2 fails the Job at once,
a disrupted pod does not count) and podReplacementPolicy Failed. Kueue: `kueue.x-k8s.io/queue-name` from
spec.queueName, `kueue.x-k8s.io/priority-class` from spec.workloadPriorityClassName (Kueue falls back to
the pods' priorityClassName for the workload's priority when it is unset).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fusion.uris import is_relative
from fusionrun_operator.capabilities import Capabilities
from fusionrun_operator.config import PERMANENT_EXIT_CODE, OperatorConfig
from jobs.registry import INDEX_ENV, SHARDS_ENV, format_indexes
from jobs.retry import TERMINATION_LOG_ENV
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
LABEL_GROUP = f"{API_GROUP}/group"
ANNOTATION_MEMBERS = f"{API_GROUP}/members"  # an Indexed shard group's [task id, attempt] per index
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
MAX_NAME = 63
CONTAINER = "stage"
TERMINATION_LOG = "/dev/termination-log"  # the container's terminationMessagePath (the default)


@dataclass(frozen=True)
class PodRole:
    """What sets one pod template apart: a task's own Job (nothing set), one node rank of a per-rank
    training group (rank), every rank of an Indexed training Job (gang_job: its name), or the shards of
    an Indexed shard group (shards, in completion-index order)."""

    rank: int | None = None
    gang_job: str | None = None
    shards: tuple[int, ...] = ()

    @property
    def indexed(self) -> bool:
        return self.gang_job is not None or bool(self.shards)


@dataclass(frozen=True)
class RunRef:
    """The FusionRun that owns the objects (its identity, labels and generation)."""

    name: str
    namespace: str
    uid: str
    generation: int = 1
    labels: dict[str, str] = field(default_factory=dict)

    def adopt(self, obj: dict[str, Any]) -> None:
        """Make the run own `obj` as kopf.adopt does, without kopf (this module stays pure): the run is its
        controller (deleting the run deletes it), it lives in the run's namespace, and it carries the run's
        labels that it does not set itself."""
        meta = obj.setdefault("metadata", {})
        refs = meta.setdefault("ownerReferences", [])
        if not any(ref.get("uid") == self.uid for ref in refs):
            refs.append(
                {
                    "controller": True,
                    "blockOwnerDeletion": True,
                    "apiVersion": f"{API_GROUP}/{API_VERSION}",
                    "kind": KIND,
                    "name": self.name,
                    "uid": self.uid,
                }
            )
        meta.setdefault("namespace", self.namespace)
        labels = meta.setdefault("labels", {})
        for key, value in self.labels.items():
            labels.setdefault(key, value)


def k8s_name(*parts: str | int, limit: int = MAX_NAME) -> str:
    """Parts joined by '-', a DNS-1123 label of <= `limit` (63) chars; longer names keep a readable prefix
    and end with 10 hex digits of the full name's sha256 (distinct long names stay distinct)."""
    full = "-".join(str(p) for p in parts)
    if len(full) <= limit:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:10]
    return f"{full[: limit - 11].rstrip('-')}-{digest}"


def indexed_name_limit(completions: int) -> int:
    """Longest name of an Indexed Job: its pods' hostnames `<job>-<index>` must stay DNS labels."""
    return MAX_NAME - 1 - len(str(max(completions - 1, 0)))


def job_name(run: str, task_id: str, attempt: int, rank: int | None = None) -> str:
    return k8s_name(run, task_id, attempt) if rank is None else k8s_name(run, task_id, attempt, f"r{rank}")


def service_name(run: str, task_id: str) -> str:
    return k8s_name(run, task_id)


def pod_hostname(run: str, task_id: str, rank: int) -> str:
    return k8s_name(run, task_id, rank)


def effective_spec(spec: FusionRunSpec, config: OperatorConfig) -> FusionRunSpec:
    """The spec the Jobs run with: a relative local store (the spec default, meaningless in a cluster)
    becomes the operator's default store when one is configured."""
    if not (config.default_store_uri and is_relative(spec.store.uri)):
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


def _index_env(role: PodRole) -> list[dict[str, Any]]:
    """The completion index (first: later values refer to it as $(JOB_COMPLETION_INDEX)) and a shard
    group's shard list. Set explicitly: the job controller adds JOB_COMPLETION_INDEX only from 1.22."""
    if not role.indexed:
        return []
    field_path = f"metadata.annotations['{INDEX_ANNOTATION}']"
    env: list[dict[str, Any]] = [{"name": INDEX_ENV, "valueFrom": {"fieldRef": {"fieldPath": field_path}}}]
    if role.shards:
        env.append({"name": SHARDS_ENV, "value": format_indexes(role.shards)})
    return env


def _env(
    run: RunRef, spec: FusionRunSpec, task: Task, attempt: int, role: PodRole, config: OperatorConfig
) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        *_index_env(role),
        {"name": "FUSIONRUN_NAME", "value": run.name},
        # The whole spec, secret-free by construction: credentialsSecret holds names, not keys.
        {"name": "FUSIONRUN_SPEC", "value": spec.model_dump_json(by_alias=True, exclude_none=True)},
        {"name": "FUSIONRUN_TASK", "value": task.group if role.shards else task.id},
    ]
    if not role.shards:  # a shard group's members each have their own attempt (the Job's annotation)
        env.append({"name": "FUSIONRUN_ATTEMPT", "value": str(attempt)})
    env += [
        {"name": "FUSIONRUN_CACHE", "value": "/scratch/cache"},
        {"name": "TMPDIR", "value": "/scratch"},  # the emptyDir itself (a subfolder would not exist)
        {"name": "HOME", "value": "/scratch"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": TERMINATION_LOG_ENV, "value": TERMINATION_LOG},
    ]
    if not config.reuse:  # FUSIONRUN_REUSE=off reaches the stages too: no shared cache at all
        env.append({"name": "FUSIONRUN_REUSE", "value": "off"})
    secret = spec.store.credentials_secret
    if secret is not None:
        for var, key in (
            ("AWS_ACCESS_KEY_ID", secret.access_key_key),
            ("AWS_SECRET_ACCESS_KEY", secret.secret_key_key),
        ):
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": key}}})
    return env


def _master_addr(run: RunRef, spec: FusionRunSpec, task: Task, role: PodRole) -> str:
    """Rank 0's stable DNS name behind the headless Service; 127.0.0.1 for one node (no Service)."""
    if spec.training.nodes == 1:
        return "127.0.0.1"
    svc = f"{service_name(run.name, task.id)}.{run.namespace}.svc"
    host = f"{role.gang_job}-0" if role.gang_job else pod_hostname(run.name, task.id, 0)
    return f"{host}.{svc}"


def _node_rank(role: PodRole) -> str:
    return f"$({INDEX_ENV})" if role.gang_job else str(role.rank or 0)


def _rendezvous_env(
    run: RunRef, spec: FusionRunSpec, task: Task, role: PodRole, config: OperatorConfig
) -> list[dict[str, str]]:
    nodes, procs = spec.training.nodes, spec.training.procs_per_node
    env = {
        "MASTER_ADDR": _master_addr(run, spec, task, role),
        "MASTER_PORT": str(config.master_port),
        "WORLD_SIZE": str(nodes * procs),
        "NODE_RANK": _node_rank(role),
        "NNODES": str(nodes),
        "NPROC_PER_NODE": str(procs),
    }
    if procs == 1:  # one process per pod runs the trainer directly: it needs its own RANK and LOCAL_RANK
        env |= {"RANK": _node_rank(role), "LOCAL_RANK": "0"}
    return [{"name": k, "value": v} for k, v in env.items()]


def _command(spec: FusionRunSpec, task: Task, role: PodRole, config: OperatorConfig) -> list[str]:
    if task.distributed and spec.training.procs_per_node > 1:
        # Several processes per pod (one per GPU): torchrun starts them with RANK/LOCAL_RANK set.
        t = spec.training
        return [
            "torchrun",
            f"--nnodes={t.nodes}",
            f"--nproc-per-node={t.procs_per_node}",
            f"--node-rank={_node_rank(role)}",
            "--master-addr=$(MASTER_ADDR)",
            f"--master-port={config.master_port}",
            "-m",
            "jobs",
            *task.args(),
        ]
    return ["python", "-m", "jobs", *task.args(from_index=bool(role.shards))]


def container_security() -> dict[str, Any]:
    """The stage container's security context. Read-only root: a stage writes only to its volumes (HOME,
    TMPDIR and the caches point at /scratch); tests/test_images.py runs every stage so."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def pod_spec(
    run: RunRef, spec: FusionRunSpec, task: Task, attempt: int, config: OperatorConfig, role: PodRole
) -> dict[str, Any]:
    """The pod of one task attempt (one node rank of it, or every index of an Indexed Job): its stage
    container, scratch and /dev/shm volumes, the hardened security context, scheduling fields, and stable
    DNS names for multi-node ranks."""
    res = stage_resources(spec, task.stage.value, config)
    multi_node = task.distributed and spec.training.nodes > 1
    env = _env(run, spec, task, attempt, role, config)
    if task.distributed:
        env += _rendezvous_env(run, spec, task, role, config)
    volumes = [{"name": "scratch", "emptyDir": {}}]
    mounts = [{"name": "scratch", "mountPath": "/scratch"}]
    if task.definition.accelerated:  # torch workers and NCCL need a real /dev/shm
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or config.job_image,
        "imagePullPolicy": spec.image_pull_policy or config.image_pull_policy,
        "command": _command(spec, task, role, config),
        "env": env,
        "resources": _resources(res),
        "volumeMounts": mounts,
        "securityContext": container_security(),
        # The stage's last error line (FUSIONRUN_TERMINATION_LOG), else the log's tail on an error.
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
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
        if not role.gang_job:  # an Indexed Job's pods get the hostname <job>-<index> from Kubernetes
            pod["hostname"] = pod_hostname(run.name, task.id, role.rank or 0)
        pod["subdomain"] = service_name(run.name, task.id)
    return pod


def job_labels(run: RunRef, spec: FusionRunSpec, labels: dict[str, str]) -> dict[str, str]:
    """A Job's own labels: the pods' labels and the run's Kueue labels (queue, workload priority)."""
    out = dict(labels)
    if spec.queue_name:
        out[KUEUE_QUEUE_LABEL] = spec.queue_name
    if spec.workload_priority_class_name:
        out[KUEUE_PRIORITY_LABEL] = spec.workload_priority_class_name
    return out


def failure_policy(config: OperatorConfig) -> dict[str, Any]:
    """The Job fields that make Kubernetes classify pod failures as the operator does, where the server
    has them: exit code 2 (bad input) fails the Job at once; a disrupted pod (preemption, eviction, node
    drain: condition DisruptionTarget) is replaced without counting against the Job's limit; a
    replacement starts only once the old pod is gone (no two pods of one index or rank at once)."""
    out: dict[str, Any] = {}
    if config.server.pod_failure_policy:
        out["podFailurePolicy"] = {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": CONTAINER,
                        "operator": "In",
                        "values": [PERMANENT_EXIT_CODE],
                    },
                },
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]
        }
    if config.server.pod_replacement_policy:
        out["podReplacementPolicy"] = "Failed"
    return out


def job_object(
    run: RunRef, name: str, labels: dict[str, str], annotations: dict[str, str], job_spec: dict[str, Any]
) -> dict[str, Any]:
    """A batch/v1 Job owned by the run (ownerReferences: deleting the run deletes it)."""
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": run.namespace,
            "labels": labels,
            "annotations": {ANNOTATION_GENERATION: str(run.generation), **annotations},
        },
        "spec": job_spec,
    }
    run.adopt(job)
    return job


def job_timing(spec: FusionRunSpec, active_deadline_seconds: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if active_deadline_seconds is not None:
        out["activeDeadlineSeconds"] = max(1, int(active_deadline_seconds))
    if spec.ttl_seconds_after_finished is not None:
        out["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    return out


def job_manifest(
    run: RunRef,
    spec: FusionRunSpec,
    task: Task,
    *,
    attempt: int,
    config: OperatorConfig,
    rank: int | None = None,
    active_deadline_seconds: float | None = None,
) -> dict[str, Any]:
    """The batch/v1 Job of one task attempt (one node rank of it for multi-node training).

    rank: None for every task but training; training gets 0..nodes-1. active_deadline_seconds: what is
    left of the run's deadline (the Job must not outlive the run)."""
    multi_node = task.distributed and spec.training.nodes > 1
    labels = labels_for(run.name, task, attempt, rank if task.distributed else None)
    job_spec: dict[str, Any] = {
        "backoffLimit": 0,
        "completions": 1,
        "parallelism": 1,
        **failure_policy(config),
        "template": {
            "metadata": {"labels": labels},
            "spec": pod_spec(run, spec, task, attempt, config, PodRole(rank=rank)),
        },
        **job_timing(spec, active_deadline_seconds),
    }
    name = job_name(run.name, task.id, attempt, rank if multi_node else None)
    return job_object(run, name, job_labels(run, spec, labels), {}, job_spec)


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
    run.adopt(svc)
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

    def job(rank: int | None) -> dict[str, Any]:
        deadline = active_deadline_seconds
        return job_manifest(
            run, spec, task, attempt=attempt, config=config, rank=rank, active_deadline_seconds=deadline
        )

    if not task.distributed:
        return [job(None)]
    nodes = spec.training.nodes
    jobs = [job(r) for r in range(nodes)]
    return [service_manifest(run, task, config), *jobs] if nodes > 1 else jobs


def ranks_of(spec: FusionRunSpec, task: Task, server: Capabilities | None = None) -> int:
    """How many Jobs one attempt of the task is: the node count for multi-node training in the per-rank
    shape (server without Indexed Jobs), else 1."""
    per_rank = task.distributed and spec.training.nodes > 1 and not (server and server.indexed_training)
    return spec.training.nodes if per_rank else 1


def task_job_names(run: str, spec: FusionRunSpec, task: Task, attempt: int) -> list[str]:
    if ranks_of(spec, task) > 1:
        return [job_name(run, task.id, attempt, r) for r in range(spec.training.nodes)]
    return [job_name(run, task.id, attempt)]
