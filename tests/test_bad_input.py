"""The bad-input matrix of issue 15 (tests/bad_input_cases.py): what the cluster accepts is what `fusionrun
validate` accepts.

- every case through `fusionrun validate` (default suite);
- every case through an offline model of the cluster: the CRD's schema (jsonschema, after the pruning the
  API server does) and the operator's own parser fed the stored spec and the last-applied configuration
  (default suite);
- every case on the real API server, kubectl and the operator (@k8s; about 30 s), one API server and one
  operator for the whole matrix: FAST_IDS first, then the rest.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from jobs import crd as crdmod
from jobs.cli import main as fusionrun
from jobs.kubeyaml import KubeYamlError, decode, load_yaml
from tests.bad_input_cases import CASES, FAST_IDS, Case
from tests.harness.fusionrun_k8s import OperatorProcess, get_run, run_jobs
from tests.harness.k8s import ControlPlane, k8s_fixture  # noqa: F401  (fixture)
from tests.test_crd import to_draft4


def test_the_matrix_is_big_and_consistent() -> None:
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    for c in CASES:
        # validate says no exactly when the cluster does (server refuses or the operator fails the run)
        assert (c.validate == "ok") == c.accepted, c.id
        assert (c.operator is None) == (c.server != "ok"), c.id


# --------------------------------------------------------------------------------------------------
# fusionrun validate


def validate(tmp_path: Path, c: Case, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    path = tmp_path / f"{c.id}.yaml"
    text = c.file_text("run-a")
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    code = fusionrun(["validate", str(path)])
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_validate(c: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, output = validate(tmp_path, c, capsys)
    if c.validate == "ok":
        assert code == 0 and "valid FusionRun 'run-a'" in output, output
        assert (f"note: {tmp_path}" in output) == bool(c.note) and (c.note or "") in output, output
    else:
        assert code == 1 and c.validate in output, output
        assert "Traceback" not in output
        assert output.count(str(tmp_path)) == 1, output  # the file named once


# --------------------------------------------------------------------------------------------------
# the cluster, offline: the CRD schema with the server's pruning, and the operator's parser


def _schema_of(schema: dict[str, Any], key: str) -> dict[str, Any] | None:
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return {}
    props = schema.get("properties")
    return props.get(key) if props is not None else schema.get("additionalProperties")


def pruned(doc: Any, schema: dict[str, Any]) -> Any:
    """`doc` as the API server stores it: unknown fields and nulls of non-nullable fields dropped."""
    if isinstance(doc, dict) and schema.get("type") == "object":
        out = {}
        for k, v in doc.items():
            sub = _schema_of(schema, k)
            if sub is None or (v is None and not sub.get("nullable")):
                continue
            out[k] = pruned(v, sub) if sub else v
        return out
    if isinstance(doc, list) and "items" in schema:
        return [pruned(v, schema["items"]) for v in doc]
    return doc


def _k8s_integer(_: Any, value: Any) -> bool:
    """The API server's `type: integer`: an int64, or a number with no fraction that fits one (5.0 is 5)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return (isinstance(value, int) or value.is_integer()) and -(2**63) <= value < 2**63


K8S_TYPES = jsonschema.Draft4Validator.TYPE_CHECKER.redefine("integer", _k8s_integer)
K8sValidator = jsonschema.validators.extend(jsonschema.Draft4Validator, type_checker=K8S_TYPES)


def offline_cluster(c: Case) -> str:
    """The server's and the operator's verdict without a server: "ok", "server" or "operator"."""
    from fusionrun_operator.config import OperatorConfig
    from fusionrun_operator.pipeline import InvalidSpec, parse_pipeline

    raw = c.file_text("run-a")
    try:
        doc = load_yaml(decode(raw) if isinstance(raw, bytes) else raw)
        json.dumps(doc, allow_nan=False)  # what kubectl sends is JSON
    except (KubeYamlError, ValueError):
        return "server"
    root = crdmod.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    if "apiVersion" not in doc or not (doc.get("metadata") or {}).get("name"):
        return "server"  # kubectl refuses to send it
    stored = pruned(doc, root)
    try:
        K8sValidator(to_draft4(root["properties"]["spec"])).validate(stored.get("spec"))
    except jsonschema.ValidationError:
        return "server"
    pipe = parse_pipeline(stored["spec"], OperatorConfig(job_image="img:1"), json.dumps(doc))
    return "operator" if isinstance(pipe, InvalidSpec) else "ok"


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_offline_cluster_agrees(c: Case) -> None:
    verdict = offline_cluster(c)
    expected = "ok" if c.accepted else ("server" if c.server != "ok" else "operator")
    assert verdict == expected


# --------------------------------------------------------------------------------------------------
# the real cluster: kubectl, the API server 1.20 and the operator


def kubectl_apply(k8s: ControlPlane, ns: str, path: Path, *flags: str) -> tuple[bool, str]:
    proc = k8s.kubectl("apply", *flags, "-f", str(path), namespace=ns, check=False)
    return proc.returncode == 0, proc.stderr + proc.stdout


def operator_verdict(k8s: ControlPlane, ns: str, name: str, timeout: float = 60) -> dict[str, Any]:
    """The run's status once the operator has looked at it (observedGeneration set)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = (get_run(k8s, ns, name) or {}).get("status") or {}
        if status.get("observedGeneration"):
            return status
        time.sleep(0.3)
    raise AssertionError(f"the operator never wrote the status of {name}")


def check_on_cluster(k8s: ControlPlane, ns: str, tmp: Path, cases: list[Case]) -> list[str]:
    """Apply every case as a user would; returns what disagreed with the matrix (empty: all agree)."""
    tmp.mkdir(parents=True, exist_ok=True)
    wrong: list[str] = []
    applied: dict[str, Case] = {}
    for i, c in enumerate(cases):
        name = f"m{i:02d}-{re.sub(r'[^a-z0-9]', '', c.id.lower())[:30]}"
        path = tmp / f"{name}.yaml"
        text = c.file_text(name)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        if c.client:  # kubectl's own validation (the default) catches it before sending
            ok, out = kubectl_apply(k8s, ns, path, "--dry-run=client")
            if ok or c.client not in out:
                wrong.append(
                    f"{c.id}: kubectl's validation: expected {c.client!r}, got {out.strip()[-300:]!r}"
                )
        ok, out = kubectl_apply(k8s, ns, path, "--validate=false")
        if (c.server == "ok") != ok or (not ok and c.server not in out):
            wrong.append(f"{c.id}: server: expected {c.server!r}, got {out.strip()[-300:]!r}")
        elif ok:
            applied[name] = c
    for name, c in applied.items():
        st = operator_verdict(k8s, ns, name)
        jobs = run_jobs(k8s, ns, name)
        if c.operator == "ok":
            suspended = st.get("phase") == "Suspended"
            if st.get("phase") == "Failed" or (not suspended and not jobs):
                wrong.append(
                    f"{c.id}: operator: expected a running run, got {st.get('phase')}: {st.get('message')}"
                )
        elif st.get("phase") != "Failed" or c.operator not in (st.get("message") or "") or jobs:
            reason = next((x.get("reason") for x in st.get("conditions", []) if x["type"] == "Failed"), None)
            wrong.append(
                f"{c.id}: operator: expected InvalidSpec {c.operator!r}, got {reason}: {st.get('message')}"
            )
    return wrong


@pytest.fixture(scope="module")
def matrix_cluster(k8s: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """One namespace and one operator (not reading stores) for every case of the module."""
    k8s.apply_crds()
    wait_for_published_schema(k8s)
    ns = k8s.create_namespace("bad-input")
    tmp = tmp_path_factory.mktemp("bad-input")
    with OperatorProcess(k8s, ns, tmp / "operator.log", FUSIONRUN_READ_STORE="false") as op:
        yield ns, tmp
        assert op.alive() and not op.errors(), op.log()[-3000:]
    k8s.delete_namespace(ns)


def wait_for_published_schema(k8s: ControlPlane, timeout: float = 60) -> None:
    """kubectl validates against the OpenAPI the server publishes, a few seconds after the CRD is applied."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (
            k8s.kubectl(
                "explain", "fusionrun.spec.store.credentialsSecret.accessKeyKey", check=False
            ).returncode
            == 0
        ):
            return
        time.sleep(1)
    raise AssertionError("the FusionRun schema was never published to kubectl")


@pytest.mark.k8s
def test_fast_cases_on_the_cluster(k8s: ControlPlane, matrix_cluster: tuple[str, Path]) -> None:
    ns, tmp = matrix_cluster
    cases = [c for c in CASES if c.id in FAST_IDS]
    assert check_on_cluster(k8s, ns, tmp / "fast", cases) == []


@pytest.mark.k8s
def test_every_case_on_the_cluster(k8s: ControlPlane, matrix_cluster: tuple[str, Path]) -> None:
    ns, tmp = matrix_cluster
    cases = [c for c in CASES if c.id not in FAST_IDS]
    wrong = check_on_cluster(k8s, ns, tmp / "all", cases)
    assert wrong == [], "\n".join(wrong)
