"""Credentials policy: which Secret a run may use, whose keys the operator sends where, and the two
conditions that say so (CredentialsReady, StoreReadable) with a Warning event once per distinct problem.

The rule: a FusionRun never makes the operator use credentials its author could not use anyway.
- A Secret named by spec.store.credentialsSecret is used (handed to the run's Jobs, read by the operator to
  see the run's store) only when it carries the label fusionrun.dev/store-credentials: "true", set by
  whoever owns the Secret. Otherwise a run could hand any Secret of its namespace to a Job running an image
  of its choice, or have its key sent to an endpoint of its choice. Such a run starts no Job and fails
  (reason SecretNotOptedIn), until the Secret opts in or the spec changes.
- The operator's own identity (its environment, pod identity) reads only the operator's own default store
  (same URI and endpoint): never a bucket or an endpoint a run chooses.
- Keys are checked as they are read (surrounding whitespace dropped, inner whitespace refused) and never
  appear in a message.
Pure: the Secret comes in as kube.read_secret's SecretRead.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

from fusionrun_operator.config import OperatorConfig
from fusionrun_operator.effects import Event
from fusionrun_operator.observations import Access, SecretRead
from jobs.credentials import CredentialsError, clean_key
from jobs.derive import Blocked
from jobs.spec import SECRET_OPT_IN_LABEL, SecretKeyRef, StoreSpec
from jobs.status import Condition, FusionRunStatus

CREDENTIALS_READY = "CredentialsReady"
STORE_READABLE = "StoreReadable"
# Problems a person must fix (the Secret's owner, the cluster admin, the run's author): the run fails.
# Any other problem with the Secret (not there yet, the API briefly unavailable) makes the run wait.
FATAL = frozenset({"SecretNotOptedIn", "SecretNotReadable", "SecretKeyMissing", "InvalidCredentials"})

Keys = tuple[str, str]  # (access key id, secret access key)


@dataclass(frozen=True)
class CredentialsCheck:
    access: Access
    keys: Keys | None = field(default=None, repr=False)  # usable keys; None without a usable Secret


@dataclass(frozen=True)
class StoreReading:
    """Whether the operator reads the run's store this pass, and with which keys (None: no keys, or its
    own identity); `skipped` says why not."""

    read: bool
    keys: Keys | None = field(default=None, repr=False)
    skipped: Access | None = None


def check_secret(namespace: str, ref: SecretKeyRef | None, read: SecretRead | None) -> CredentialsCheck:
    """The run's credentials Secret judged by the rule above (read: None only when ref is None)."""
    if ref is None or read is None:
        msg = "no store.credentialsSecret: the Jobs use their ServiceAccount's identity"
        return CredentialsCheck(Access(True, "NoSecretNamed", msg))
    where = f"Secret {namespace}/{ref.name} (spec.store.credentialsSecret)"
    problem = _secret_problem(where, ref, read)
    if problem is not None:
        return CredentialsCheck(problem)
    try:
        keys = tuple(_key(where, read, k) for k in (ref.access_key_key, ref.secret_key_key))
    except CredentialsError as err:
        return CredentialsCheck(Access(False, "InvalidCredentials", str(err)))
    return CredentialsCheck(Access(True, "SecretOptedIn", f"{where} opts in and holds both keys"), keys)


def _secret_problem(where: str, ref: SecretKeyRef, read: SecretRead) -> Access | None:
    keys = f"{ref.access_key_key} and {ref.secret_key_key}"
    label = f'{SECRET_OPT_IN_LABEL}: "true"'
    if read.status == 404:
        return Access(
            False,
            "SecretNotFound",
            f"{where} does not exist: create it with the keys {keys} and "
            f"the label {label}; no Job starts until then",
        )
    if read.status == 403:
        return Access(
            False,
            "SecretNotReadable",
            f"the operator may not read {where} (RBAC), so it cannot "
            "check that the Secret opts in: add its name to the chart's rbac.secretNames",
        )
    if read.status != 200:
        return Access(False, "SecretUnavailable", f"reading {where} failed (HTTP {read.status}); retrying")
    if read.labels.get(SECRET_OPT_IN_LABEL) != "true":
        return Access(
            False,
            "SecretNotOptedIn",
            f"{where} lacks the label {label}: FusionRun uses only "
            "Secrets that opt in, so that a run cannot hand any Secret of its namespace to its Jobs "
            f"or to an endpoint it chooses; if it holds S3 keys meant for FusionRun runs: kubectl "
            f"label secret {ref.name} {SECRET_OPT_IN_LABEL}=true",
        )
    missing = [k for k in (ref.access_key_key, ref.secret_key_key) if k not in read.data]
    if missing:
        return Access(
            False,
            "SecretKeyMissing",
            f"{where} has no key {missing[0]!r}: add it, or name the "
            "right key in credentialsSecret.accessKeyKey / secretKeyKey",
        )
    return None


def _key(where: str, read: SecretRead, key: str) -> str:
    what = f"key {key!r} of {where}"
    try:
        value = base64.b64decode(read.data[key], validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise CredentialsError(f"{what} is not UTF-8 text") from None
    return clean_key(value, what)


def blocking(credentials: Access | None) -> Access | None:
    """The credentials problem that keeps the run from starting Jobs, if any."""
    return credentials if credentials is not None and credentials.ok is False else None


def blocked_run(problem: Access | None) -> Blocked | None:
    """The credentials problem as the run's summary takes it (jobs.derive): fatal problems fail the run."""
    return None if problem is None else Blocked(problem.reason, problem.message, problem.reason in FATAL)


def is_operator_store(store: StoreSpec, config: OperatorConfig) -> bool:
    """Whether `store` is the operator's own default store (same URI and endpoint): the only S3 store the
    operator reads with its own identity."""
    default = (config.default_store_uri or "").rstrip("/")
    return (
        default.startswith("s3://")
        and store.uri.rstrip("/") == default
        and (store.endpoint or None) == (config.default_store_endpoint or None)
    )


def plan_store_read(
    store: StoreSpec, config: OperatorConfig, check: CredentialsCheck, for_status: bool = True
) -> StoreReading:
    """Whether and with what the operator reads the run's store (see the rule above); for_status=False: to
    delete its artifacts (spec.deleteArtifacts), whatever FUSIONRUN_READ_STORE says."""
    if for_status and not config.read_store:
        msg = "the operator does not read stores (FUSIONRUN_READ_STORE=false): status comes from Jobs"
        return StoreReading(False, skipped=Access(None, "StoreReadsDisabled", msg))
    if not store.is_s3:
        return StoreReading(True)
    if store.credentials_secret is not None:
        if check.keys is not None:
            return StoreReading(True, check.keys)
        msg = f"not read without usable credentials (see {CREDENTIALS_READY}): status comes from Jobs"
        return StoreReading(False, skipped=Access(None, "CredentialsNotReady", msg))
    if is_operator_store(store, config):
        return StoreReading(True)
    msg = (
        "the operator reads a store without a credentialsSecret only at its own default store, so that "
        "its identity never reaches an endpoint or bucket a run chooses: name an opted-in credentialsSecret "
        "to see progress from the store; status comes from Jobs meanwhile"
    )
    return StoreReading(False, skipped=Access(None, "NotTheOperatorsStore", msg))


def access_conditions(
    old: FusionRunStatus, checks: dict[str, Access | None], gen: int, now_s: str
) -> tuple[list[Condition], list[Event]]:
    """One condition per check given ({CredentialsReady: ..., StoreReadable: ...}); a Warning event when a
    check turns into a new problem (a reason not reported just before), a Normal one when it recovers."""
    conditions, events = [], []
    for type_, access in checks.items():
        if access is None:
            continue
        status = {True: "True", False: "False", None: "Unknown"}[access.ok]
        prev = old.condition(type_)
        changed = prev is None or prev.status != status
        conditions.append(
            Condition(
                type=type_,
                status=status,
                reason=access.reason,
                message=access.message or None,
                observed_generation=gen,
                last_transition_time=now_s if changed else prev.last_transition_time,
            )
        )
        if access.ok is False and (changed or prev.reason != access.reason):
            events.append(Event("Warning", access.reason, access.message))
        elif access.ok and prev is not None and prev.status == "False":
            events.append(Event("Normal", type_, access.message))
    return conditions, events
