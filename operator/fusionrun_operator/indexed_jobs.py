"""The Indexed shapes (servers with Indexed Jobs, see capabilities.py); pure, no API calls.

- Training: one Indexed Job per attempt, completions = parallelism = training.nodes, backoffLimit 0. The
  completion index is the node rank (JOB_COMPLETION_INDEX from the pod's
  batch.kubernetes.io/job-completion-index annotation); pods get the hostname `<job>-<index>` and, for
  several nodes, the subdomain of the headless Service `<run>-<task>`, so MASTER_ADDR is
  `<job>-0.<run>-<task>.<namespace>.svc`. One Job is one Kueue workload: the ranks are admitted together
  (gang). A rank that fails fails the Job (backoffLimit 0) and the operator starts the next attempt of the
  whole group, which resumes from the store's checkpoints.
- Per-shard stages (extract, align, fuse): one Indexed Job per shard group (stage + model / variant) runs
  the group's shards that are due, one index each, in shard order: FUSIONRUN_SHARDS lists them and the pod
  runs `python -m jobs <stage> ... --shard-from-index`. parallelism = resources.<stage>.parallelism (at
  most), backoffLimitPerIndex 0: a failed shard fails its index only, the others go on, and the operator
  retries the failed and missing shards (after backoff) in a later Job of the group. The annotation
  `fusionrun.dev/members` holds each index's [task id, attempt]: observations.py turns the Job back into
  one observation per task.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fusionrun_operator.config import OperatorConfig
from fusionrun_operator.k8s_objects import (
    ANNOTATION_MEMBERS,
    LABEL_GROUP,
    LABEL_MANAGED_BY,
    LABEL_RUN,
    LABEL_STAGE,
    MANAGER,
    PodRole,
    RunRef,
    failure_policy,
    indexed_name_limit,
    job_labels,
    job_object,
    job_timing,
    k8s_name,
    labels_for,
    pod_spec,
    service_manifest,
    stage_resources,
)
from jobs.spec import FusionRunSpec

if TYPE_CHECKING:
    from jobs.plan import Task

KUEUE_MIN_PARALLELISM = "kueue.x-k8s.io/job-min-parallelism"  # lets Kueue admit a shard group partly
DEFAULT_PARALLELISM = 32  # pods of one shard group at once when neither the spec nor the operator says

Member = tuple["Task", int]  # a task and the attempt it runs as


def gang_job_name(run: str, task_id: str, attempt: int, nodes: int) -> str:
    return k8s_name(run, task_id, attempt, limit=indexed_name_limit(nodes))


def gang_manifests(
    run: RunRef,
    spec: FusionRunSpec,
    task: Task,
    attempt: int,
    config: OperatorConfig,
    active_deadline_seconds: float | None = None,
) -> list[dict[str, Any]]:
    """The objects of one training attempt: the headless Service (several nodes) and one Indexed Job."""
    nodes = spec.training.nodes
    name = gang_job_name(run.name, task.id, attempt, nodes)
    labels = labels_for(run.name, task, attempt)
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": 0,  # one rank fails: the whole gang restarts, as a new attempt
        **failure_policy(config),
        "template": {
            "metadata": {"labels": labels},
            "spec": pod_spec(run, spec, task, attempt, config, PodRole(gang_job=name)),
        },
        **job_timing(spec, active_deadline_seconds),
    }
    job = job_object(run, name, job_labels(run, spec, labels), {}, job_spec)
    return [service_manifest(run, task, config), job] if nodes > 1 else [job]


def shard_parallelism(spec: FusionRunSpec, stage: str, config: OperatorConfig) -> int:
    """resources.<stage>.parallelism, else the operator's stage default, else DEFAULT_PARALLELISM."""
    return stage_resources(spec, stage, config).parallelism or DEFAULT_PARALLELISM


def group_job_name(run: str, members: Sequence[Member]) -> str:
    """`<run>-<group>-s<first shard>-<its attempt>`: every (task, attempt) runs in one Job only, so the
    first member names the Job uniquely; the same members give the same name (409 on a repeat)."""
    first, attempt = members[0]
    return k8s_name(run, first.group, f"s{first.shard}", attempt, limit=indexed_name_limit(len(members)))


def group_labels(run: str, task: Task) -> dict[str, str]:
    return {LABEL_MANAGED_BY: MANAGER, LABEL_RUN: run, LABEL_STAGE: task.stage.value, LABEL_GROUP: task.group}


def encode_members(members: Sequence[Member]) -> str:
    return json.dumps([[t.id, a] for t, a in members], separators=(",", ":"))


def decode_members(raw: str | None) -> list[tuple[str, int]]:
    """[(task id, attempt)] per completion index; [] for a missing or malformed annotation."""
    try:
        data = json.loads(raw or "[]")
        return [(str(tid), int(att)) for tid, att in data]
    except (ValueError, TypeError):
        return []


def group_manifest(
    run: RunRef,
    spec: FusionRunSpec,
    members: Sequence[Member],
    config: OperatorConfig,
    active_deadline_seconds: float | None = None,
) -> dict[str, Any]:
    """One Indexed Job for shards of one group: `members` (task, attempt), sorted by shard here."""
    members = sorted(members, key=lambda m: m[0].shard or 0)
    first, attempt = members[0]
    n = len(members)
    parallel = min(n, shard_parallelism(spec, first.stage.value, config))
    labels = group_labels(run.name, first)
    role = PodRole(shards=tuple(t.shard or 0 for t, _ in members))
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": n,
        "parallelism": parallel,
        "backoffLimitPerIndex": 0,  # a failed shard: its index fails, the others go on; the operator retries
        **failure_policy(config),
        "template": {
            "metadata": {"labels": labels},
            "spec": pod_spec(run, spec, first, attempt, config, role),
        },
        **job_timing(spec, active_deadline_seconds),
    }
    annotations = {ANNOTATION_MEMBERS: encode_members(members)}
    if parallel > 1:
        annotations[KUEUE_MIN_PARALLELISM] = "1"  # Kueue may admit fewer pods than parallelism (no gang)
    name = group_job_name(run.name, members)
    return job_object(run, name, job_labels(run, spec, labels), annotations, job_spec)


def gang_job_names(run: str, spec: FusionRunSpec, task: Task, attempt: int) -> list[str]:
    return [gang_job_name(run, task.id, attempt, spec.training.nodes)]
