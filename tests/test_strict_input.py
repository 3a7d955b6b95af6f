"""Issue 15, the jobs side: one strict parsing mode by the YAML names (what the API server accepts), YAML
read as kubectl reads it, files that cannot be read named in one line, and S3 keys checked and redacted
before any text can carry them."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

from jobs.cli import main as fusionrun
from jobs.credentials import MASK, CredentialsError, clean_key, redact
from jobs.kubeyaml import KubeYamlError, decode, load_yaml
from jobs.settings import Settings
from jobs.spec import (
    FusionRunSpec,
    SpecError,
    StageResources,
    StoreSpec,
    parse_fusionrun,
    parse_spec,
    unknown_fields,
)
from jobs.store import S3Endpoint, StoreError, _s3_error, make_s3_client

SPEC = {
    "target": {"name": "tgt", "tokenizer": "/tok", "randomInit": {}},
    "sources": [{"name": "src", "uri": "/m"}],
    "corpus": {"uri": "/c.txt"},
    "extraction": {"maxLength": 64},
    "training": {"seqLen": 64},
}
DOC = {"apiVersion": "fusionrun.dev/v1alpha1", "kind": "FusionRun", "metadata": {"name": "r"}, "spec": SPEC}


def spec_with(section: str, **fields: object) -> dict:
    out = copy.deepcopy(SPEC)
    out.setdefault(section, {}).update(fields)
    return out


def error_of(spec: dict) -> str:
    with pytest.raises(SpecError) as err:
        parse_spec(spec)
    return str(err.value)


# --------------------------------------------------------------------------------------------------
# YAML as kubectl reads it


def test_yaml_scalars_follow_kubectl() -> None:
    # Each checked against kubectl 1.32 (`kubectl apply --dry-run=client -o json`).
    doc = load_yaml(
        "a: 1e-5\nb: 2E+3\nc: 1.0e5\nd: y\ne: N\nf: 2026-11-25\ng: 1:30\nh: 0x1F\ni: 017\nj: 1_000\nk: .5\n"
        "l: yes\nm: off\nn2: null\no: '1e-5'\np: .inf\n"
    )
    assert doc == {
        "a": 1e-05,
        "b": 2000.0,
        "c": 100000.0,
        "d": True,
        "e": False,
        "f": "2026-11-25",  # PyYAML's safe_load: a datetime.date, which is no JSON
        "g": "1:30",  # PyYAML's safe_load: 90 (base 60)
        "h": 31,
        "i": 15,
        "j": 1000,
        "k": 0.5,
        "l": True,
        "m": False,
        "n2": None,
        "o": "1e-5",
        "p": float("inf"),
    }


def test_what_kubectl_does_silently_is_said() -> None:
    warnings: list[str] = []
    assert load_yaml("a: 1\nb: 2\na: 3\n", warnings) == {"a": 3, "b": 2}  # the last value, as kubectl
    assert warnings == [
        "line 3: key 'a' is written twice (first on line 1); the last value counts, as kubectl reads it"
    ]
    warnings.clear()
    assert decode(b"a: 1\nb: caf\xe9\n", warnings) == "a: 1\nb: caf\ufffd\n"
    assert warnings == [
        "line 2: byte 0xe9 is not UTF-8; read as U+FFFD, as kubectl does: save the file as UTF-8"
    ]
    for bad in ("a: [1\n", "a: 1\n---\nb: 2\n"):
        with pytest.raises(KubeYamlError):
            load_yaml(bad)


# --------------------------------------------------------------------------------------------------
# one parsing mode: strict, by the YAML names


def test_documents_are_read_by_their_yaml_names_only() -> None:
    assert "spec.training.learning_rate: unknown field; did you mean learningRate?" in error_of(
        spec_with("training", learning_rate=0.5)
    )
    # Python code still builds models by field name
    assert StageResources(gpu_resource="amd.com/gpu", node_selector={"a": "b"}).gpu_resource == "amd.com/gpu"
    assert StoreSpec(uri="s3://b/p", credentials_secret={"name": "k"}).credentials_secret.name == "k"


@pytest.mark.parametrize(
    ("section", "field", "value", "message"),
    [
        ("training", "maxSteps", "5", "spec.training.maxSteps: Input should be a valid integer (got '5')"),
        ("training", "clmBaseline", "true", "spec.training.clmBaseline: Input should be a valid boolean"),
        ("training", "learningRate", "1e-5", "spec.training.learningRate: Input should be a valid number"),
        ("training", "betas", ["0.9", 0.95], "spec.training.betas.0: Input should be a valid number"),
        ("training", "maxSteps", 5.5, "spec.training.maxSteps: Input should be a valid integer (got 5.5)"),
        ("training", "seed", 2**63, "spec.training.seed: is beyond the 64-bit integer range"),
        ("training", "seed", -(2**63) - 1, "spec.training.seed: is beyond the 64-bit integer range"),
        ("fusion", "temperature", float("inf"), "spec.fusion.temperature: Input should be a finite number"),
        ("training", "epochs", float("nan"), "spec.training.epochs: Input should be a finite number"),
        ("retry", "restartNonce", 2, "spec.retry.restartNonce: Input should be a valid string (got 2)"),
        ("corpus", "format", "txt", "spec.corpus.format: Input should be 'auto', 'text', 'jsonl'"),
    ],
)
def test_no_coercion_and_kubernetes_bounds(section: str, field: str, value: object, message: str) -> None:
    assert message in error_of(spec_with(section, **{field: value}))


def test_what_the_api_server_accepts_is_accepted_alike() -> None:
    spec = parse_spec(
        spec_with("training", maxSteps=5.0, seed=2**63 - 1, betas=[0.8, 0.9], epochs=1)
        | {"fusion": None, "retry": {"restartFrom": "fuse"}, "corpus": {"uri": "/c", "format": "jsonl"}}
    )
    assert spec.training.max_steps == 5 and isinstance(spec.training.max_steps, int)  # the server stores 5
    assert spec.training.seed == 2**63 - 1 and spec.training.betas == (0.8, 0.9)
    assert spec.fusion.strategy == "minCE"  # null is absent: the server prunes it
    assert (spec.retry.restart_from, spec.corpus.format) == ("fuse", "jsonl")


def test_the_document_around_the_spec_is_strict_too() -> None:
    parse_fusionrun(DOC | {"status": {"phase": "Running"}})  # `kubectl get -o yaml` output validates
    for doc, message in [
        ({k: v for k, v in DOC.items() if k != "apiVersion"}, "apiVersion: Field required"),
        (DOC | {"suspend": True}, "suspend: unknown field"),
        (DOC | {"spce": {}}, "spce: unknown field; did you mean spec?"),
        (
            DOC | {"metadata": {"name": "r", "lables": {}}},
            "metadata.lables: unknown field; did you mean labels?",
        ),
        (
            DOC | {"metadata": {"name": "r", "labels": {"a": 1}}},
            "metadata.labels.a: Input should be a valid string",
        ),
    ]:
        with pytest.raises(SpecError) as err:
            parse_fusionrun(doc)
        assert message in str(err.value)


def test_unknown_fields_are_listed_with_suggestions() -> None:
    doc = DOC | {"spec": spec_with("training", lamda=0.5) | {"suspended": True}}
    assert unknown_fields(doc) == [
        ("spec.training.lamda", "unknown field; did you mean lambda?"),
        ("spec.suspended", "unknown field; did you mean suspend?"),
    ]
    assert unknown_fields(DOC) == []
    # other errors are not its business
    assert unknown_fields(DOC | {"spec": spec_with("training", maxSteps="x")}) == []


@pytest.mark.parametrize(
    ("store", "ok"),
    [
        ({"uri": "s3://bucket"}, True),
        ({"uri": "s3://my.bucket-1/runs/a b"}, True),
        ({"uri": "/abs/runs"}, True),
        ({"uri": "file://./runs"}, True),
        ({"uri": "s3://"}, False),
        ({"uri": "s3:///runs"}, False),
        ({"uri": "file://runs"}, False),  # relative without ./: failed only inside the first Job before
        ({"uri": "gs://bucket"}, False),
        ({"uri": "s3://b", "endpoint": "https://minio.svc:9000"}, True),
        ({"uri": "s3://b", "endpoint": "http://[::1]:8333", "insecure": True}, True),
        ({"uri": "s3://b", "endpoint": "minio:9000"}, False),
        ({"uri": "s3://b", "endpoint": "https://minio 9000"}, False),
        ({"uri": "s3://b", "endpoint": "https://key:secret@minio"}, False),
        ({"uri": "s3://b", "region": "us-east-1"}, True),
        ({"uri": "s3://b", "region": ""}, True),  # the SDK's default, as before
        ({"uri": "s3://b", "region": "us east"}, False),
        ({"uri": "s3://b", "credentialsSecret": {"name": "S3_KEYS"}}, False),
        ({"uri": "s3://b", "credentialsSecret": {"name": "k", "accessKeyKey": "a key"}}, False),
    ],
)
def test_store_locations_are_checked_at_validation(store: dict, ok: bool) -> None:
    if ok:
        parse_spec(SPEC | {"store": store})
    else:
        assert "spec.store." in error_of(SPEC | {"store": store})


# --------------------------------------------------------------------------------------------------
# files


def test_files_that_cannot_be_read_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert fusionrun(["validate", str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"{tmp_path}: is a folder; give the FusionRun YAML file\n"
    assert fusionrun(["validate", str(tmp_path / "nope.yaml")]) == 1
    assert capsys.readouterr().err == f"{tmp_path / 'nope.yaml'}: no such FusionRun file\n"
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.yaml"
        locked.write_text("a: 1\n")
        locked.chmod(0)
        assert fusionrun(["validate", str(locked)]) == 1
        assert capsys.readouterr().err == f"{locked}: cannot be read (Permission denied)\n"


# --------------------------------------------------------------------------------------------------
# S3 keys: checked when read, never in a message

# What botocore's HTTP client raised for an access key id with a trailing newline (seen on this machine).
HEADER_ERROR = (
    "An HTTP Client raised an unhandled exception: Invalid header value b'AWS4-HMAC-SHA256 "
    "Credential=AKIAPLANTED123\\n/20261128/us-east-1/s3/aws4_request, SignedHeaders=host;x-amz-date, "
    "Signature=0e04c4a996e07e325704be4c98b4ffe8a521f12da390d8a2fd35fe042d38e18d'"
)


def test_redact_removes_signed_request_material() -> None:
    out = redact(HEADER_ERROR)
    assert "AKIAPLANTED" not in out and "0e04c4a9" not in out
    assert out.count(MASK) == 2 and "Invalid header value" in out
    assert redact("Authorization: AWS AKIAXYZ12345:c2lnbmF0dXJl") == f"Authorization: {MASK}"
    assert (
        redact("?X-Amz-Credential=AK%2F1&X-Amz-Signature=ab12&x=1")
        == f"?X-Amz-Credential={MASK}&X-Amz-Signature={MASK}&x=1"
    )
    assert redact("X-Amz-Security-Token: FwoGZXIvYXdzE") == f"X-Amz-Security-Token: {MASK}"
    assert redact("the key is hunter2-secret\n.", ["hunter2-secret\n"]) == f"the key is {MASK}."


def test_keys_are_cleaned_or_refused_without_their_value() -> None:
    assert clean_key("AKIAPLANTED123\n", "the key") == "AKIAPLANTED123"
    for bad, problem in (
        ("AKIA PLANTED", "contains whitespace"),
        ("\n", "is empty"),
        ("AK\x00IA", "control"),
    ):
        with pytest.raises(CredentialsError) as err:
            clean_key(bad, "key 'AWS_ACCESS_KEY_ID' of Secret ns/s3")
        assert problem in str(err.value) and "PLANTED" not in str(err.value)


def test_the_s3_client_uses_cleaned_keys() -> None:
    store = StoreSpec(uri="s3://b/p", endpoint="http://127.0.0.1:9", insecure=True)
    client = make_s3_client(store, 1, credentials=("AKIAPLANTED123\n", " s3cret\n"))
    creds = client._request_signer._credentials
    assert (creds.access_key, creds.secret_key) == ("AKIAPLANTED123", "s3cret")
    # kubectl create secret --from-file of an echo: the keys the settings read from the environment
    env = {"AWS_ACCESS_KEY_ID": "AKIAFROMENV\n", "AWS_SECRET_ACCESS_KEY": "envsecret\n"}
    from_env = S3Endpoint.of(store, Settings.from_env(env))
    assert make_s3_client(from_env, 1)._request_signer._credentials.access_key == "AKIAFROMENV"
    spaced = S3Endpoint.of(store, Settings.from_env({**env, "AWS_ACCESS_KEY_ID": "AKIA FROM ENV"}))
    with pytest.raises(StoreError) as err:
        make_s3_client(spaced, 1)
    assert err.value.reason == "InvalidCredentials" and err.value.permanent and "FROM" not in str(err.value)


def test_store_errors_carry_no_request_headers() -> None:
    from botocore.exceptions import HTTPClientError

    err = _s3_error(HTTPClientError(error=HEADER_ERROR), "http://s3:8333", "b", "reading x")
    assert "AKIAPLANTED" not in str(err) and "Signature=0e04" not in str(err)
    assert str(err).startswith("S3 endpoint http://s3:8333, bucket 'b': HTTPClientError while reading x")


def test_a_spec_model_is_still_a_spec() -> None:
    assert FusionRunSpec.model_config["strict"] and FusionRunSpec.model_config["extra"] == "forbid"
