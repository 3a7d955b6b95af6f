"""Settings are read from the environment once, at an entry point, and passed down (jobs.settings)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from fusionrun_operator.config import ConfigError, from_env

from jobs.settings import S3Settings, Settings, SettingsError
from jobs.spec import StoreSpec
from jobs.store import LocalStore, S3Endpoint, S3Store, endpoint_of, make_s3_client, open_store

ROOT = Path(__file__).resolve().parents[1]


def test_the_environment_becomes_typed_settings() -> None:
    assert Settings.from_env({}) == Settings()
    env = {
        "FUSIONRUN_CACHE": "/c",
        "FUSIONRUN_REUSE": "off",
        "FUSIONRUN_CACHE_LEASE_SECONDS": "60",
        "FUSIONRUN_CACHE_POLL_SECONDS": "0.5",
        "FUSIONRUN_S3_MAX_ATTEMPTS": "3",
        "FUSIONRUN_S3_CONNECT_TIMEOUT": "1",
        "FUSIONRUN_S3_READ_TIMEOUT": "2",
        "FUSIONRUN_S3_CHECK_SECONDS": "0",
        "FUSIONRUN_S3_ENDPOINT": "http://s3.local:8333",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "AKIAPLANTED",
        "AWS_SECRET_ACCESS_KEY": "s3cretPLANTED",
        "AWS_SESSION_TOKEN": "tokenPLANTED",
        "OMP_NUM_THREADS": "3",
        "FUSIONRUN_NAME": "demo",
        "FUSIONRUN_SPEC": "{}",
    }
    s = Settings.from_env(env)
    assert (s.cache_dir, s.reuse, s.cache_lease_seconds, s.cache_poll_seconds) == (Path("/c"), False, 60, 0.5)
    assert s.s3 == S3Settings(
        3,
        1.0,
        2.0,
        0.0,
        "http://s3.local:8333",
        "eu-west-1",
        ("AKIAPLANTED", "s3cretPLANTED"),
        "tokenPLANTED",
    )
    assert (s.threads, s.run_name, s.spec_json) == (3, "demo", "{}")
    assert Settings.from_env({**env, "FUSIONRUN_THREADS": "2"}).threads == 2  # before OMP_NUM_THREADS
    assert Settings.from_env({"AWS_REGION": "a", "AWS_DEFAULT_REGION": "b"}).s3.region == "a"
    assert Settings.from_env({"AWS_ACCESS_KEY_ID": "only-one"}).s3.keys is None  # both or none
    assert "PLANTED" not in repr(s)  # keys never reach a log line


@pytest.mark.parametrize(
    ("var", "value", "problem"),
    [
        ("FUSIONRUN_S3_MAX_ATTEMPTS", "many", "expected an integer"),
        ("FUSIONRUN_S3_MAX_ATTEMPTS", "0", "must be at least 1"),
        ("FUSIONRUN_S3_CHECK_SECONDS", "soon", "expected a number"),
        ("FUSIONRUN_CACHE_POLL_SECONDS", "-1", "must be at least 0"),
        ("FUSIONRUN_THREADS", "all", "expected an integer"),
    ],
)
def test_a_bad_value_fails_when_the_settings_are_built_naming_the_variable(var, value, problem) -> None:
    with pytest.raises(SettingsError, match=rf"^{var}='{value}': {problem}"):
        Settings.from_env({var: value})
    with pytest.raises(ConfigError, match=var):  # the operator's main reads the same variables
        from_env({var: value})


def test_the_store_carries_its_settings_to_what_it_opens(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path / "c", s3=S3Settings(max_attempts=3, connect_timeout=1.5))
    local = open_store(StoreSpec(uri=str(tmp_path)), "run", settings)
    assert isinstance(local, LocalStore) and local.settings is settings
    assert local.sibling("_cache").settings is settings
    assert endpoint_of(local, StoreSpec(uri="s3://b/p")).settings is settings  # s3:// models of a local run
    s3 = open_store(StoreSpec(uri="s3://b/p", endpoint="http://127.0.0.1:9", insecure=True), "run", settings)
    assert isinstance(s3, S3Store) and s3.settings is settings and s3.sibling("_cache").settings is settings
    cfg = s3.client.meta.config
    assert (cfg.retries["total_max_attempts"], cfg.connect_timeout) == (4, 1.5)
    # an explicit client is used as given (the operator's, with the run's keys)
    client = make_s3_client(S3Endpoint.of(StoreSpec(uri="s3://b/p"), settings), credentials=("k", "s"))
    assert open_store(StoreSpec(uri="s3://b/p"), "run", settings, client=client).client is client


def test_an_operator_pass_never_waits_at_the_bucket_check() -> None:
    """S3Store.check retries an endpoint that does not answer for s3.check_seconds: the operator's pass
    settings give it none (a pass reads again next time), whatever FUSIONRUN_S3_CHECK_SECONDS says."""
    cfg = from_env({"FUSIONRUN_S3_CHECK_SECONDS": "30", "AWS_REGION": "eu-west-1"})
    s3 = cfg.store_settings.s3
    assert (s3.check_seconds, s3.max_attempts, s3.connect_timeout, s3.read_timeout) == (0, 2, 3, 10)
    assert s3.region == "eu-west-1"  # the rest as the environment says


# Modules that read the environment, and why: entry points, and what is not a setting of ours.
READS_ENVIRONMENT = {
    "jobs/settings.py": "builds the settings",
    "jobs/cli.py": "the entry points (`fusionrun`, `python -m jobs`; an Indexed Job's completion index)",
    "jobs/stages/train.py": "training's own entry point and its ranks' launcher environment",
    "jobs/local.py": "the environment the local runner's task processes inherit",
    "jobs/stages/evaluate_tasks.py": "sets HF_DATASETS_OFFLINE for lm-eval",
    "jobs/stages/common.py": "run_guarded, every stage process's failure handler: the termination log's path",
    "operator/fusionrun_operator/main.py": "the operator's entry point",
}


def test_below_the_entry_points_nothing_reads_the_environment() -> None:
    readers = {
        str(path.relative_to(ROOT))
        for root in ("jobs", "operator/fusionrun_operator")
        for path in (ROOT / root).rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv")
    }
    assert readers <= set(READS_ENVIRONMENT), readers - set(READS_ENVIRONMENT)
