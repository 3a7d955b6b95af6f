"""The FusionRun CustomResourceDefinition, generated from the pydantic models (spec and status).

`python -m jobs.cli crd --write` writes crds/fusionrun.yaml and charts/fusionrun/crds/fusionrun.yaml; a
test regenerates it and fails when the committed file is out of date.

Pydantic emits JSON Schema 2020-12; Kubernetes wants a *structural* OpenAPI v3 schema. The conversion:
- `$ref`s are inlined (OpenAPI in a CRD has no `$defs`); titles dropped; descriptions kept;
- `anyOf: [X, {type: null}]` (Optional) becomes X with `nullable: true`, except for objects: the API server
  publishes a nullable object to kubectl (OpenAPI v2) without its properties, so kubectl and Helm could not
  catch a misspelt field inside it; a non-nullable object's null is pruned, which means unset, as None does;
- `exclusiveMinimum: n` (2020-12, a number) becomes `minimum: n, exclusiveMinimum: true` (OpenAPI 3.0);
- tuples (`prefixItems`) become arrays with `minItems`/`maxItems`;
- `additionalProperties: false` is dropped (forbidden next to `properties`: the API server prunes unknown
  fields instead, and the operator's pydantic validation rejects them where pruning does not happen);
- free-form objects (`dict[str, Any]`) get `x-kubernetes-preserve-unknown-fields: true`;
- defaults are kept for scalars and lists; null, "" and [] defaults are dropped (absent means the same,
  and a 1.20 API server reads an empty default as null and rejects the CRD).
No CEL (`x-kubernetes-validations`): the local API server is 1.20. Cross-field rules (unique model
names, hiddenSize divisible by numHeads, ...) are checked by the operator, which fails the run with
reason InvalidSpec and pydantic's message. Imports no torch.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from jobs.spec import API_GROUP, API_VERSION, KIND, PLURAL, FusionRunSpec, Metadata
from jobs.status import FusionRunStatus

SINGULAR = "fusionrun"
SHORT_NAMES = ["fr"]
CATEGORIES = ["all", "ml"]
CRD_NAME = f"{PLURAL}.{API_GROUP}"
RUN_NAME_PATTERN: str = Metadata.model_json_schema()["properties"]["name"]["pattern"]
REPO_ROOT = Path(__file__).resolve().parent.parent
CRD_PATHS = (
    REPO_ROOT / "crds" / "fusionrun.yaml",
    REPO_ROOT / "charts" / "fusionrun" / "crds" / "fusionrun.yaml",
)

# JSON-Schema keywords with an OpenAPI v3 (Kubernetes) meaning that survive as they are.
_KEEP = {
    "type",
    "description",
    "enum",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "format",
    "default",
    "nullable",
    "items",
    "properties",
    "required",
    "additionalProperties",
    "exclusiveMinimum",
    "exclusiveMaximum",
}


class CrdError(ValueError):
    """The pydantic schema uses a construct that has no structural OpenAPI v3 form."""


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            if name not in defs:
                raise CrdError(f"unresolvable $ref {node['$ref']!r}")
            merged = {**copy.deepcopy(defs[name]), **{k: v for k, v in node.items() if k != "$ref"}}
            return _resolve(merged, defs)
        return {k: _resolve(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, defs) for v in node]
    return node


def _structural(node: dict[str, Any], path: str) -> dict[str, Any]:
    """One resolved JSON-Schema node -> its structural OpenAPI v3 form."""
    node = dict(node)
    nullable = False
    if "anyOf" in node:
        any_of = node.pop("anyOf")
        options = [o for o in any_of if o.get("type") != "null"]
        nullable = len(options) < len(any_of)
        if len(options) != 1:
            raise CrdError(f"{path}: a union of several types has no structural schema; use one type")
        # The option carries the type; the outer node carries default/description.
        node = {**options[0], **node}
    out: dict[str, Any] = {}
    if "prefixItems" in node:  # a fixed-length tuple of one item type
        items = node.pop("prefixItems")
        if any(i != items[0] for i in items):
            raise CrdError(f"{path}: tuples of mixed types have no structural schema")
        node.pop("maxItems", None), node.pop("minItems", None)
        out.update(items=_structural(items[0], f"{path}[]"), minItems=len(items), maxItems=len(items))
    for key, value in node.items():
        if key in ("title", "$defs", "const", "examples"):
            continue
        if key not in _KEEP:
            raise CrdError(f"{path}: JSON-Schema keyword {key!r} has no conversion to the CRD schema")
        if key == "properties":
            out["properties"] = {k: _structural(v, f"{path}.{k}") for k, v in value.items()}
        elif key == "items":
            out["items"] = _structural(value, f"{path}[]")
        elif key == "additionalProperties":
            if isinstance(value, dict) and value:
                out["additionalProperties"] = _structural(value, f"{path}.*")
            elif value is True or value == {}:
                out["x-kubernetes-preserve-unknown-fields"] = True
            # False: dropped; pruning removes unknown fields (properties + additionalProperties is forbidden)
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound], out[key] = value, True
        elif key == "default":
            # "" and [] are dropped: 1.20 servers read an empty default as null and refuse the CRD.
            if value not in (None, "", []) and not isinstance(value, dict):
                out["default"] = list(value) if isinstance(value, tuple) else value
        else:
            out[key] = value
    if nullable and out.get("type") != "object":
        out["nullable"] = True
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    if "type" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        raise CrdError(f"{path}: no type; structural schemas need one at every level")
    # Stable, readable order in the YAML: type and description first.
    first = [k for k in ("type", "description") if k in out]
    return {**{k: out[k] for k in first}, **{k: v for k, v in out.items() if k not in first}}


def openapi_schema(model: type, path: str) -> dict[str, Any]:
    """A pydantic model class -> a structural OpenAPI v3 schema (camelCase field names)."""
    schema = model.model_json_schema(by_alias=True)  # type: ignore[attr-defined]
    defs = schema.pop("$defs", {})
    return _structural(_resolve(schema, defs), path)


def _as_list_map(array: dict[str, Any], key: str) -> dict[str, Any]:
    array["x-kubernetes-list-type"] = "map"
    array["x-kubernetes-list-map-keys"] = [key]
    # A list-map key must be required (or defaulted) in every item.
    required = array["items"].setdefault("required", [])
    if key not in required:
        required.append(key)
    return array


def status_schema() -> dict[str, Any]:
    status = openapi_schema(FusionRunStatus, "status")
    props = status["properties"]
    _as_list_map(props["conditions"], "type")
    _as_list_map(props["tasks"], "id")
    _as_list_map(props["training"], "variant")
    return status


def crd() -> dict[str, Any]:
    """The whole CRD (apiextensions.k8s.io/v1), accepted by API servers from 1.16 on."""
    spec_schema = openapi_schema(FusionRunSpec, "spec")
    spec_schema["description"] = "What to fuse and how: see jobs/spec.py (the single source of truth)."
    columns = [
        {"name": "Stage", "type": "string", "jsonPath": ".status.stage"},
        {"name": "Progress", "type": "string", "jsonPath": ".status.progress"},
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": {"app.kubernetes.io/name": "fusionrun"}},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": CATEGORIES,
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "description": "FuseLLM knowledge fusion of large language models: one run.",
                            "type": "object",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                # Only name/generateName may be restricted; the name ends up in Job
                                # names, labels and store keys, so it is bounded like jobs.spec.Metadata.
                                "metadata": {
                                    "type": "object",
                                    "properties": {
                                        "name": {
                                            "type": "string",
                                            "maxLength": 40,
                                            "pattern": RUN_NAME_PATTERN,
                                        }
                                    },
                                },
                                "spec": spec_schema,
                                "status": status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


HEADER = (
    "# Generated by `python -m jobs.cli crd --write` from jobs/spec.py and jobs/status.py: do not edit.\n"
)


def crd_yaml() -> str:
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=110, allow_unicode=True)


def write_crds(paths: tuple[Path, ...] = CRD_PATHS) -> list[Path]:
    """Write the CRD where it is kept (atomically: a reader never sees half a file)."""
    text = crd_yaml()
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.partial")
        tmp.write_text(text)
        tmp.replace(p)
    return list(paths)


def stale_crds(paths: tuple[Path, ...] = CRD_PATHS) -> list[Path]:
    """Which CRD files differ from what the models generate now (missing counts as stale)."""
    text = crd_yaml()
    return [p for p in paths if not p.is_file() or p.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="fusionrun crd", description="Print or write the FusionRun CRD.")
    ap.add_argument("--write", action="store_true", help="write crds/ and the Helm chart's crds/")
    ap.add_argument("--check", action="store_true", help="exit 1 when the written CRDs are out of date")
    args = ap.parse_args(argv)
    if args.check:
        stale = stale_crds()
        for p in stale:
            print(f"out of date: {p} (run `python -m jobs.cli crd --write`)")
        return 1 if stale else 0
    if args.write:
        for p in write_crds():
            print(f"wrote {p}")
        return 0
    print(crd_yaml(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
