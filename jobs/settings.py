"""The process's settings: what the environment says, read once where a process starts and passed down.

Each entry point builds one with `Settings.from_env(os.environ)`: the `fusionrun` command, a stage's main
(`python -m jobs`, jobs.cli.stage_main; training's own main), the operator's main (its OperatorConfig holds
the one its passes use). Below them nothing reads the environment: `jobs.store.open_store` takes the
settings, and the stores and S3 endpoints it makes carry them to what they open in turn (the shared cache
area, s3:// models and corpora), so an operator pass never waits on a variable it read mid-pass.

| variable | default | meaning |
|---|---|---|
| FUSIONRUN_CACHE | ~/.cache/fusionrun | downloads of s3:// models and corpora |
| FUSIONRUN_REUSE | on | share prepare/extract/align outputs across runs (jobs.cache); off: do not |
| FUSIONRUN_CACHE_LEASE_SECONDS | 600 | a shared entry's lease not renewed for this long is taken over |
| FUSIONRUN_CACHE_POLL_SECONDS | 5 | how often a task waiting for another run's entry looks again |
| FUSIONRUN_S3_MAX_ATTEMPTS | 8 | attempts per S3 request (botocore's standard retries, exponential backoff) |
| FUSIONRUN_S3_CONNECT_TIMEOUT, FUSIONRUN_S3_READ_TIMEOUT | 5, 60 | seconds |
| FUSIONRUN_S3_CHECK_SECONDS | 30 | how long an endpoint that does not answer is retried before any work |
| FUSIONRUN_S3_ENDPOINT | (none) | `fusionrun`: replaces store.endpoint of an S3 store (another server) |
| AWS_REGION, AWS_DEFAULT_REGION | us-east-1 | the S3 region where the spec names none |
| AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN | (none) | S3 keys (else boto3's chain) |
| FUSIONRUN_THREADS, OMP_NUM_THREADS | (torch's) | a stage's torch threads (the local runner's share) |
| FUSIONRUN_NAME, FUSIONRUN_SPEC | (none) | a stage's run name and spec (JSON), as Kubernetes Jobs get them |

One variable stays outside: FUSIONRUN_TERMINATION_LOG (where a failing stage leaves its error line for the
kubelet) is read by the entry points' failure handler (jobs.stages.common.run_guarded), since the settings
may be what failed to build.

Imports nothing of ours (the bottom layer of jobs/). A bad value fails when the settings are built, naming
the variable (SettingsError), not halfway through a task.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


class SettingsError(ValueError):
    """A variable with a value that is not allowed; the message names it."""


@dataclass(frozen=True)
class S3Settings:
    """How this process talks to S3 (jobs.store.make_s3_client, S3Store.check)."""

    max_attempts: int = 8
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    check_seconds: float = 30.0  # an endpoint that refuses or does not resolve, retried before any work
    endpoint: str | None = None  # FUSIONRUN_S3_ENDPOINT: replaces the spec's store.endpoint (the CLI)
    region: str | None = None  # where the spec names none (AWS_REGION, AWS_DEFAULT_REGION)
    keys: tuple[str, str] | None = field(default=None, repr=False)  # (access key id, secret access key)
    session_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Settings:
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "fusionrun")
    reuse: bool = True
    cache_lease_seconds: float = 600.0
    cache_poll_seconds: float = 5.0
    s3: S3Settings = field(default_factory=S3Settings)
    threads: int = 0  # 0: torch's own choice
    run_name: str | None = None
    spec_json: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """The settings the variables in `env` give (entry points pass os.environ; tests, a mapping)."""
        d, ds = cls(), S3Settings()
        keys = (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) if _has_keys(env) else None
        s3 = S3Settings(
            max_attempts=int(env_number(env, "FUSIONRUN_S3_MAX_ATTEMPTS", ds.max_attempts, int, 1)),
            connect_timeout=env_number(env, "FUSIONRUN_S3_CONNECT_TIMEOUT", ds.connect_timeout, float, 0),
            read_timeout=env_number(env, "FUSIONRUN_S3_READ_TIMEOUT", ds.read_timeout, float, 0),
            check_seconds=env_number(env, "FUSIONRUN_S3_CHECK_SECONDS", ds.check_seconds, float, 0),
            endpoint=env.get("FUSIONRUN_S3_ENDPOINT") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            keys=keys,
            session_token=(env.get("AWS_SESSION_TOKEN") or None) if keys else None,
        )
        cache = env.get("FUSIONRUN_CACHE")
        threads_var = "FUSIONRUN_THREADS" if env.get("FUSIONRUN_THREADS") else "OMP_NUM_THREADS"
        threads = {threads_var: env.get(threads_var) or ""}
        return cls(
            cache_dir=Path(cache) if cache else d.cache_dir,
            reuse=env.get("FUSIONRUN_REUSE", "on") != "off",
            cache_lease_seconds=env_number(
                env, "FUSIONRUN_CACHE_LEASE_SECONDS", d.cache_lease_seconds, float
            ),
            cache_poll_seconds=env_number(
                env, "FUSIONRUN_CACHE_POLL_SECONDS", d.cache_poll_seconds, float, 0
            ),
            s3=s3,
            threads=int(env_number(threads, threads_var, 0, int, 0)),
            run_name=env.get("FUSIONRUN_NAME") or None,
            spec_json=env.get("FUSIONRUN_SPEC") or None,
        )


def _has_keys(env: Mapping[str, str]) -> bool:
    return bool(env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"))


def env_number(
    env: Mapping[str, str], key: str, default: float, kind: type, minimum: float | None = None
) -> float:
    """A number from a variable (default when unset or empty); a bad value raises SettingsError naming it."""
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise SettingsError(f"{key}={raw!r}: expected a{'n integer' if kind is int else ' number'}") from None
    if minimum is not None and value < minimum:
        raise SettingsError(f"{key}={raw!r}: must be at least {minimum}")
    return value
