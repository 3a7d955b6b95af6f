"""The operator's layering, read from its source: structs < policies < engine < I/O < kopf wiring, the few
modules allowed to use jobs.plan / jobs.complete (the lead's stage registry replaces them there), every
API call in kube.py, no settings read at import time, no torch, and functions short enough to read."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "operator" / "fusionrun_operator"
MODULES = sorted(p for p in PKG.rglob("*.py"))
PURE = {
    "capabilities",
    "indexed_jobs",
    "config",
    "times",
    "effects",
    "observations",
    "pipeline",
    "k8s_objects",
    "reconcile",
    *(f"policies.{p.stem}" for p in (PKG / "policies").glob("*.py") if p.stem != "__init__"),
}
IO = {"kube", "store_view", "scheduling", "runtime", "handlers", "main", "metrics", "logs", "claims"}


def name_of(path: Path) -> str:
    return ".".join(path.relative_to(PKG).with_suffix("").parts)


def runtime_imports(path: Path) -> set[str]:
    """Modules imported when the module runs (imports under `if TYPE_CHECKING:` are for type hints only)."""
    tree = ast.parse(path.read_text())
    hints = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
        for n in ast.walk(node)
    }
    out = set()
    for node in ast.walk(tree):
        if id(node) in hints:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_every_module_is_in_a_layer() -> None:
    names = {name_of(p) for p in MODULES} - {"__init__", "policies.__init__"}
    assert names == PURE | IO


@pytest.mark.parametrize("path", [p for p in MODULES if name_of(p) in PURE], ids=name_of)
def test_pure_modules_do_no_io(path: Path) -> None:
    bad = {
        m
        for m in runtime_imports(path)
        if m.split(".")[0] in ("kubernetes", "boto3", "botocore", "threading", "os")
        or m.removeprefix("fusionrun_operator.") in IO
        or m in ("jobs.store", "jobs.complete")
    }
    assert not bad, f"{name_of(path)} imports {bad}"


def test_policies_sit_below_the_engine() -> None:
    for path in (PKG / "policies").glob("*.py"):
        assert "fusionrun_operator.reconcile" not in runtime_imports(path), path.name


def test_jobs_plan_and_manifest_are_used_in_one_place_each() -> None:
    users = {
        m: sorted(name_of(p) for p in MODULES if m in runtime_imports(p))
        for m in ("jobs.plan", "jobs.complete")
    }
    assert users == {"jobs.plan": ["pipeline"], "jobs.complete": ["store_view"]}


def test_every_api_call_is_in_kube() -> None:
    callers = set()
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "_api":
                callers.add(name_of(path))
    assert callers == {"kube"}


def test_settings_are_not_read_at_import_time() -> None:
    """A bad FUSIONRUN_* value fails when main builds the settings, not when a module is imported (tests and
    tools import the handlers freely); and nothing imports torch."""
    mods = ", ".join(f"fusionrun_operator.{name_of(p)}" for p in MODULES if p.stem != "__init__")
    code = (
        f"import sys, {mods}; "
        "bad = [m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules]; "
        "print(bad); raise SystemExit(1 if bad else 0)"
    )
    env = {**os.environ, "FUSIONRUN_RESYNC_SECONDS": "soon", "FUSIONRUN_JOB_IMAGE_PULL_POLICY": "Sometimes"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout + r.stderr


def test_main_builds_the_settings_from_env_and_flags() -> None:
    from fusionrun_operator.config import ConfigError
    from fusionrun_operator.main import parse_args, settings

    env = {
        "FUSIONRUN_NAMESPACES": "x",
        "FUSIONRUN_LIVENESS": "http://0.0.0.0:9/healthz",
        "FUSIONRUN_MASTER_PORT": "1234",
    }
    cfg = settings(parse_args(["-n", "a", "-n", "b, c", "--liveness", ""]), env)
    assert (cfg.namespaces, cfg.liveness, cfg.master_port) == (("a", "b", "c"), None, 1234)
    cfg = settings(parse_args(["-A"]), env)
    assert cfg.clusterwide and cfg.liveness == "http://0.0.0.0:9/healthz"
    assert settings(parse_args([]), env).namespaces == ("x",)
    with pytest.raises(ConfigError, match="FUSIONRUN_RESYNC_SECONDS='soon'"):
        settings(parse_args([]), {"FUSIONRUN_RESYNC_SECONDS": "soon"})


def function_lengths() -> list[tuple[int, str]]:
    out = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                out.append((node.end_lineno - node.lineno + 1, f"{name_of(path)}.{node.name}"))
    return sorted(out, reverse=True)


def test_functions_fit_on_a_screen() -> None:
    longest = function_lengths()[:3]
    assert longest[0][0] <= 60, longest
