"""YAML read the way kubectl reads it, so that `fusionrun validate` sees the values the API server gets.

kubectl (sigs.k8s.io/yaml, go-yaml v2 rules) and PyYAML's safe loader disagree on a few plain scalars:

| written | kubectl sends | PyYAML's safe_load |
|---|---|---|
| `1e-5`, `2E+3`, `1.0e5` | a number | the string "1e-5" (its float needs a dot and a signed exponent) |
| `y`, `n`, `Y`, `N` | a boolean | a string |
| `2026-11-25` | the string | a datetime.date (not JSON) |
| `1:30` | the string | the integer 90 (base-60) |
| a key written twice | the last value | the last value |
| a byte that is not UTF-8 | U+FFFD in its place | an error |

`load_yaml` / `decode` use kubectl's rules for all of these, and say what kubectl does silently (a key
written twice, bytes that are not UTF-8) as warnings. Pure (no I/O beyond the text given).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

_BOOL = "tag:yaml.org,2002:bool"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"

# go-yaml v2's plain-scalar rules (resolve.go): booleans of YAML 1.1, integers in base 2/8/10/16 (no base 60),
# floats with or without a dot and with an optionally signed exponent, and the .inf / .nan spellings.
_BOOL_RE = re.compile(
    r"^(?:y|Y|yes|Yes|YES|n|N|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF)$"
)
_INT_RE = re.compile(r"^(?:[-+]?0b[01_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$")
_FLOAT_RE = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)


class KubeYamlError(ValueError):
    """The text is not YAML kubectl would accept; the message says where."""


class _KubeLoader(yaml.SafeLoader):
    warnings: list[str]

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                self.warnings.append(
                    f"line {line}: key {key!r} is written twice (first on line {seen[key]}); the last value "
                    "counts, as kubectl reads it"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_bool(self, node: yaml.ScalarNode) -> bool:
        return self.construct_scalar(node).lower() in ("y", "yes", "true", "on")


_KubeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _INT, _FLOAT, _TIMESTAMP)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_KubeLoader.add_implicit_resolver(_BOOL, _BOOL_RE, list("yYnNtTfFoO"))
_KubeLoader.add_implicit_resolver(_INT, _INT_RE, list("-+0123456789"))
_KubeLoader.add_implicit_resolver(_FLOAT, _FLOAT_RE, list("-+.0123456789"))
_KubeLoader.add_constructor(_BOOL, _KubeLoader.construct_yaml_bool)


def load_yaml(text: str, warnings: list[str] | None = None) -> Any:
    """One YAML document, with kubectl's scalar rules; KubeYamlError (naming the line) when it is not YAML or
    holds several documents. A key written twice keeps its last value and is noted in `warnings`."""
    loader = _KubeLoader(text)
    loader.warnings = warnings if warnings is not None else []
    try:
        return loader.get_single_data()
    except yaml.YAMLError as err:
        raise KubeYamlError(" ".join(str(err).split())) from None
    finally:
        loader.dispose()


def decode(data: bytes, warnings: list[str] | None = None) -> str:
    """UTF-8 text as kubectl reads it: a byte that is not UTF-8 becomes U+FFFD (noted in `warnings`)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        if warnings is not None:
            warnings.append(
                f"line {line}: byte 0x{data[err.start]:02x} is not UTF-8; read as U+FFFD, as kubectl does: "
                "save the file as UTF-8"
            )
        return data.decode("utf-8", errors="replace")
