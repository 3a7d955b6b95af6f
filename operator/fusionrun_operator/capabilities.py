"""What the API server can do, and so which shape the operator gives a run's Jobs; pure.

Read once at start (runtime.Operator.detect_server: the server's version, then one dry-run create of a
probe Job, whose answer shows which optional Job fields the server keeps: a field behind a disabled
feature gate is dropped silently). A feature is used when the version is at least its minimum and, when
the probe could run, the server kept its field; otherwise its fallback applies.

| feature (Job fields) | minimum | fallback |
|---|---|---|
| Indexed training: completionMode Indexed, pod hostnames `<job>-<index>` | 1.24 | a Job per node rank |
| Indexed shard groups: + backoffLimitPerIndex (a failed shard stops no other) | 1.29 | a Job per shard |
| podFailurePolicy: exit code 2 -> FailJob, DisruptionTarget -> Ignore | 1.26 | not sent |
| podReplacementPolicy: Failed (a new pod only once the old one is gone) | 1.29 | not sent |
| a Failed Job stays failed (Job tracking with finalizers) | 1.26 | failed Jobs deleted with their attempt |

`FUSIONRUN_JOB_SHAPE` overrides the choice: `per-task` (today's shape everywhere) or `indexed` (as if
the server had every feature: for benchmarks and servers that hide their version).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

Version = tuple[int, int]

INDEXED_JOBS: Version = (1, 24)  # completionMode Indexed GA, with stable pod hostnames
POD_FAILURE_POLICY: Version = (1, 26)  # beta, on by default
POD_REPLACEMENT_POLICY: Version = (1, 29)  # beta, on by default
BACKOFF_LIMIT_PER_INDEX: Version = (1, 29)  # beta, on by default
# Job tracking with finalizers (GA): before it, a Job whose failed pod is deleted forgets the failure.
FAILED_JOBS_FINAL: Version = (1, 26)

SHAPES = ("auto", "indexed", "per-task")


@dataclass(frozen=True)
class Capabilities:
    """The Job features the operator may use on this server (all off: the shape every server runs)."""

    version: Version | None = None
    indexed_jobs: bool = False
    pod_failure_policy: bool = False
    pod_replacement_policy: bool = False
    backoff_limit_per_index: bool = False
    source: str = "not detected"  # how it was decided: probe, version, setting, not detected

    @property
    def failed_jobs_final(self) -> bool:
        """Whether a Failed Job stays failed. Before 1.26 the Job controller counts failures from the pods
        it can still see: delete the failed pod (`kubectl delete pod`, an eviction) and the Job starts a
        replacement, even with backoffLimit 0 (seen on 1.20: a deleted training pod came back beside the
        operator's next attempt). Unknown version: assume not."""
        return self.version is not None and self.version >= FAILED_JOBS_FINAL

    @property
    def indexed_training(self) -> bool:
        return self.indexed_jobs

    @property
    def indexed_shards(self) -> bool:
        """Shard groups as Indexed Jobs need per-index backoff: without it one failing shard would fail
        the whole group Job (backoffLimit 0) or use up a limit meant for all of them."""
        return self.indexed_jobs and self.backoff_limit_per_index

    @property
    def shape(self) -> str:
        """status.jobShape."""
        if self.indexed_shards:
            return "Indexed"
        return "IndexedTraining" if self.indexed_training else "PerTask"

    def describe(self) -> str:
        """One line for the JobShape event and the operator's log."""
        where = "Kubernetes " + (
            f"v{self.version[0]}.{self.version[1]}" if self.version else "(version unknown)"
        )
        used = [
            name
            for name, on in (
                ("Indexed Jobs", self.indexed_jobs),
                ("backoffLimitPerIndex", self.backoff_limit_per_index),
                ("podFailurePolicy", self.pod_failure_policy),
                ("podReplacementPolicy", self.pod_replacement_policy),
            )
            if on
        ]
        shape = {
            "Indexed": "one Indexed Job per training attempt and per shard group",
            "IndexedTraining": "one Indexed Job per training attempt, one Job per shard task",
            "PerTask": "one Job per task and per training rank",
        }[self.shape]
        features = ", ".join(used) if used else "no optional Job features"
        return f"Jobs: {self.shape} ({shape}); {where} ({self.source}): {features}"


def parse_version(info: Mapping[str, Any]) -> Version | None:
    """(major, minor) from the server's /version ("1", "27+" on managed clusters; else gitVersion)."""
    try:
        return int(re.sub(r"\D", "", str(info["major"]))), int(re.sub(r"\D", "", str(info["minor"])))
    except (KeyError, ValueError):
        m = re.match(r"v?(\d+)\.(\d+)", str(info.get("gitVersion", "")))
        return (int(m.group(1)), int(m.group(2))) if m else None


def probe_job(namespace: str) -> dict[str, Any]:
    """A Job with every optional field the operator may send, for a dry-run create (never stored)."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"generateName": "fusionrun-capability-probe-", "namespace": namespace},
        "spec": {
            "completionMode": "Indexed",
            "completions": 1,
            "parallelism": 1,
            "backoffLimitPerIndex": 0,
            "podReplacementPolicy": "Failed",
            "podFailurePolicy": {
                "rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]
            },
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "probe", "image": "probe", "command": ["true"]}],
                }
            },
        },
    }


def from_server(version: Version | None, kept: Mapping[str, Any] | None) -> Capabilities:
    """The features of a server of `version` whose dry-run answer to probe_job() had the Job spec `kept`
    (None: the probe could not run, trust the version alone)."""

    def on(field: str, minimum: Version) -> bool:
        return version is not None and version >= minimum and (kept is None or field in kept)

    return Capabilities(
        version=version,
        indexed_jobs=on("completionMode", INDEXED_JOBS)
        and (kept is None or kept.get("completionMode") == "Indexed"),
        pod_failure_policy=on("podFailurePolicy", POD_FAILURE_POLICY),
        pod_replacement_policy=on("podReplacementPolicy", POD_REPLACEMENT_POLICY),
        backoff_limit_per_index=on("backoffLimitPerIndex", BACKOFF_LIMIT_PER_INDEX),
        source="version" if kept is None else "version + dry-run probe",
    )


def from_setting(shape: str, detected: Capabilities) -> Capabilities:
    """FUSIONRUN_JOB_SHAPE applied to what was detected: auto keeps it; per-task turns every feature off;
    indexed turns every feature on (the server's own answer notwithstanding)."""
    if shape == "per-task":
        return Capabilities(version=detected.version, source="FUSIONRUN_JOB_SHAPE=per-task")
    if shape == "indexed":
        return Capabilities(detected.version, True, True, True, True, "FUSIONRUN_JOB_SHAPE=indexed")
    return detected
