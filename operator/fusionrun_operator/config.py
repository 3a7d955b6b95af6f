"""Operator settings, built once by main.py from the environment (the Helm chart sets these variables) and
passed to what needs them; nothing reads them at import time.

| variable | default | meaning |
|---|---|---|
| FUSIONRUN_JOB_IMAGE | ghcr.io/fusionrun/fusionrun:0.1.0 | image of stage Jobs when spec.image is unset |
| FUSIONRUN_JOB_IMAGE_PULL_POLICY | IfNotPresent | when spec.imagePullPolicy is unset |
| FUSIONRUN_NAMESPACES | (empty: cluster-wide) | comma-separated namespaces to watch |
| FUSIONRUN_RESYNC_SECONDS | 30 | timer: re-reconcile every run this often (backoff, progress, deadlines) |
| FUSIONRUN_WATCH_SERVER_TIMEOUT | 300 | seconds the API server keeps one watch open |
| FUSIONRUN_WATCH_CLIENT_TIMEOUT | 330 | client-side cap, so that a silently dead watch is reopened |
| FUSIONRUN_LIVENESS | http://0.0.0.0:8080/healthz | kopf liveness endpoint ("" disables) |
| FUSIONRUN_READ_STORE | true | read the store (completed tasks, progress, metrics); false: trust Jobs only |
| FUSIONRUN_DEFAULT_STORE_URI | (none) | store for runs whose spec.store.uri is a relative local path |
| FUSIONRUN_DEFAULT_STORE_{ENDPOINT,REGION,INSECURE,SECRET} | (none) | the default store's S3 settings |
| FUSIONRUN_MASTER_PORT | 29500 | rendezvous port of multi-node training |
| FUSIONRUN_RUN_AS_USER | 1000 | uid of stage pods (non-root) |
| FUSIONRUN_JOB_SERVICE_ACCOUNT | (none) | ServiceAccount of stage pods without spec.serviceAccountName |
| FUSIONRUN_STAGE_DEFAULTS | {} | JSON {stage: {cpu, gpus, parallelism, ...}}: fills empty spec.resources |
| FUSIONRUN_JOB_SHAPE | auto | auto: from the API server's capabilities (capabilities.py); per-task; indexed |
| FUSIONRUN_STORE_MEMO | true | remember task completion between passes (store_view); false: read every pass |
| FUSIONRUN_METRICS_PORT | 8081 | Prometheus /metrics port ("" disables) |
| FUSIONRUN_REUSE | on | share prepare/extract/align outputs across runs (jobs.cache); off: not (pods too) |

The stores a pass reads are opened with `store_settings`: jobs.settings from the same variables (region, keys,
AWS_* and FUSIONRUN_CACHE*), with the operator's own short S3 retries and timeouts and no grace at the
bucket check (`pass_settings`): a pass never waits on a store.

Pure: `from_env(mapping)` has no side effects; bad values fail with the variable's name and what is allowed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from pydantic import ValidationError

from fusionrun_operator.capabilities import SHAPES, Capabilities
from jobs.retry import EXIT_PREEMPTED, EXIT_USAGE
from jobs.settings import Settings, SettingsError, env_number
from jobs.spec import Resources, StageResources, format_validation_error

# Exit code with which stage jobs report bad input (invalid spec, bad arguments, unusable input files):
# retrying cannot help, so the run fails at once. Equal to jobs.stages.common.EXIT_USAGE (a test checks).
PERMANENT_EXIT_CODE = EXIT_USAGE
# Exit code of a stage stopped by SIGTERM after saving a checkpoint (preemption): rerun, no failure counted.
PREEMPTED_EXIT_CODE = EXIT_PREEMPTED
# Waiting reasons of a container that will not start without a change to the spec or the image: the task
# fails at once. CreateContainerConfigError (e.g. the credentials Secret does not exist yet) is not among
# them: Kubernetes retries it, and the task's message shows it while it waits.
PERMANENT_WAITING_REASONS = frozenset(
    {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
)
# Waiting reasons of every container on its way up: not worth reporting.
NORMAL_WAITING_REASONS = frozenset({"ContainerCreating", "PodInitializing"})


class ConfigError(ValueError):
    """An operator setting with a bad value; the message names the variable."""


def pass_settings(settings: Settings) -> Settings:
    """The settings a reconcile pass opens stores with: two attempts, 3 s to connect, 10 s to read, and no
    grace at the check (one HEAD: an endpoint that does not answer is reported, and read again next pass)."""
    s3 = replace(settings.s3, max_attempts=2, connect_timeout=3.0, read_timeout=10.0, check_seconds=0.0)
    return replace(settings, s3=s3)


@dataclass(frozen=True)
class OperatorConfig:
    job_image: str = "ghcr.io/fusionrun/fusionrun:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    namespaces: tuple[str, ...] = ()
    resync_seconds: float = 30.0
    server_timeout: int = 300
    client_timeout: int = 330
    liveness: str | None = "http://0.0.0.0:8080/healthz"
    read_store: bool = True
    default_store_uri: str | None = None
    default_store_endpoint: str | None = None
    default_store_region: str | None = None
    default_store_insecure: bool = False
    default_store_secret: str | None = None
    master_port: int = 29500
    run_as_user: int = 1000
    job_service_account: str | None = None
    # Per-stage pod defaults (the Helm chart's stageDefaults); see k8s_objects.stage_resources for the merge.
    stage_defaults: Mapping[str, StageResources] = field(default_factory=dict)
    job_shape: str = "auto"  # FUSIONRUN_JOB_SHAPE: auto | indexed | per-task
    store_memo: bool = True
    metrics_port: int | None = 8081
    reuse: bool = True  # FUSIONRUN_REUSE: the shared cache of stage outputs (jobs.cache)
    # What the API server supports (detected at start by runtime.Operator.detect_server, then put here with
    # dataclasses.replace); the default, nothing detected, gives today's one-Job-per-task shape.
    server: Capabilities = field(default_factory=Capabilities)
    # How a pass opens a run's store (jobs.settings, through pass_settings).
    store_settings: Settings = field(default_factory=lambda: pass_settings(Settings()), repr=False)

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces


def _bool(env: Mapping[str, str], key: str, default: bool) -> bool:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key}={raw!r}: use true or false")


def _number(env: Mapping[str, str], key: str, default: float, minimum: float, kind: type = int) -> float:
    try:
        return env_number(env, key, default, kind, minimum)
    except SettingsError as err:  # the operator's own error type: main reports it the same way
        raise ConfigError(str(err)) from None


def _stage_defaults(env: Mapping[str, str]) -> dict[str, StageResources]:
    key = "FUSIONRUN_STAGE_DEFAULTS"
    raw = env.get(key) or "{}"
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{key}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: expected a JSON object {{stage: resources}}, got {type(data).__name__}")
    try:
        parsed = Resources.model_validate(data)  # unknown stages and fields fail here, by name
    except ValidationError as err:
        msg = format_validation_error(err, root=key, model=Resources).replace(
            "invalid FusionRun", "invalid settings"
        )
        raise ConfigError(msg) from None
    return {stage: getattr(parsed, stage) for stage in data}


def from_env(env: Mapping[str, str]) -> OperatorConfig:
    """Settings from FUSIONRUN_* variables (main passes os.environ; tests, their own mapping)."""
    d = OperatorConfig()
    policy = env.get("FUSIONRUN_JOB_IMAGE_PULL_POLICY") or d.image_pull_policy
    if policy not in ("Always", "IfNotPresent", "Never"):
        raise ConfigError(f"FUSIONRUN_JOB_IMAGE_PULL_POLICY={policy!r}: use Always, IfNotPresent or Never")
    store_uri = env.get("FUSIONRUN_DEFAULT_STORE_URI") or None
    if store_uri and not store_uri.startswith(("s3://", "file:///", "/")):
        raise ConfigError(
            f"FUSIONRUN_DEFAULT_STORE_URI={store_uri!r}: use s3://bucket/prefix or an absolute path"
        )
    server_timeout = int(_number(env, "FUSIONRUN_WATCH_SERVER_TIMEOUT", d.server_timeout, 1))
    client_timeout = int(_number(env, "FUSIONRUN_WATCH_CLIENT_TIMEOUT", server_timeout + 30, 1))
    if client_timeout <= server_timeout:
        raise ConfigError(
            "FUSIONRUN_WATCH_CLIENT_TIMEOUT must exceed FUSIONRUN_WATCH_SERVER_TIMEOUT "
            f"({client_timeout} <= {server_timeout}), else healthy watches are cut"
        )
    liveness = env.get("FUSIONRUN_LIVENESS", d.liveness)
    shape = (env.get("FUSIONRUN_JOB_SHAPE") or d.job_shape).strip().lower()
    if shape not in SHAPES:
        raise ConfigError(f"FUSIONRUN_JOB_SHAPE={shape!r}: use {', '.join(SHAPES)}")
    port = {"FUSIONRUN_METRICS_PORT": env.get("FUSIONRUN_METRICS_PORT", str(d.metrics_port)).strip()}
    try:
        store_settings = pass_settings(Settings.from_env(env))
    except SettingsError as err:
        raise ConfigError(str(err)) from None
    return OperatorConfig(
        job_image=env.get("FUSIONRUN_JOB_IMAGE") or d.job_image,
        image_pull_policy=policy,
        namespaces=tuple(n.strip() for n in env.get("FUSIONRUN_NAMESPACES", "").split(",") if n.strip()),
        resync_seconds=float(_number(env, "FUSIONRUN_RESYNC_SECONDS", d.resync_seconds, 1, float)),
        server_timeout=server_timeout,
        client_timeout=client_timeout,
        liveness=liveness or None,
        read_store=_bool(env, "FUSIONRUN_READ_STORE", d.read_store),
        default_store_uri=store_uri,
        default_store_endpoint=env.get("FUSIONRUN_DEFAULT_STORE_ENDPOINT") or None,
        default_store_region=env.get("FUSIONRUN_DEFAULT_STORE_REGION") or None,
        default_store_insecure=_bool(env, "FUSIONRUN_DEFAULT_STORE_INSECURE", False),
        default_store_secret=env.get("FUSIONRUN_DEFAULT_STORE_SECRET") or None,
        master_port=int(_number(env, "FUSIONRUN_MASTER_PORT", d.master_port, 1)),
        run_as_user=int(_number(env, "FUSIONRUN_RUN_AS_USER", d.run_as_user, 1)),
        job_service_account=env.get("FUSIONRUN_JOB_SERVICE_ACCOUNT") or None,
        stage_defaults=_stage_defaults(env),
        job_shape=shape,
        store_memo=_bool(env, "FUSIONRUN_STORE_MEMO", d.store_memo),
        reuse=_bool(env, "FUSIONRUN_REUSE", d.reuse),
        metrics_port=int(_number(port, "FUSIONRUN_METRICS_PORT", 0, 1))
        if port["FUSIONRUN_METRICS_PORT"]
        else None,
        store_settings=store_settings,
    )
