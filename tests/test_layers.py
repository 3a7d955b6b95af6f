"""The import layering (pyproject.toml [tool.importlinter]) is checked, and a forbidden import fails it; the
house rules read from the source: every module of jobs/ has its layer, our own torch-free modules are
imported at the top of a file (no import inside a function hides a cycle), and functions fit on a screen."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")
PACKAGES = {
    "fusion": ROOT / "fusion",
    "jobs": ROOT / "jobs",
    "fusionrun_operator": ROOT / "operator" / "fusionrun_operator",
}
CONTRACTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def _lint(tree: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{tree}:{tree / 'operator'}"}
    return subprocess.run(
        [str(LINT), "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _copy(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    ignore = shutil.ignore_patterns("__pycache__")
    for pkg in ("fusion", "jobs", "operator/fusionrun_operator"):
        shutil.copytree(ROOT / pkg, tree / pkg, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def test_the_tree_keeps_every_contract(tmp_path: Path) -> None:
    out = _lint(_copy(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(CONTRACTS)} kept, 0 broken" in out.stdout


def test_a_forbidden_import_breaks_the_build(tmp_path: Path) -> None:
    tree = _copy(tmp_path)
    (tree / "fusion" / "leak.py").write_text("from jobs.store import open_store  # fusion must not\n")
    (tree / "operator" / "fusionrun_operator" / "heavy.py").write_text("import torch\n")
    # A lower layer reaching up, even from inside a function (the cycle such an import used to close).
    with (tree / "jobs" / "spec.py").open("a") as f:
        f.write("\n\ndef _up() -> None:\n    from jobs.store import open_store  # noqa: F401\n")
    (tree / "jobs" / "stages" / "common.py").write_text("import jobs.stages.fuse\n")
    (tree / "operator" / "fusionrun_operator" / "policies" / "peek.py").write_text(
        "from fusionrun_operator.kube import Kube  # a policy doing I/O\n"
    )
    out = _lint(tree)
    assert out.returncode == 1
    for broken in (
        "fusion.leak -> jobs.store",
        "fusionrun_operator.heavy -> torch",
        "jobs.spec -> jobs.store",
        "jobs.stages.common -> jobs.stages.fuse",
        "fusionrun_operator.policies.peek -> fusionrun_operator.kube",
    ):
        assert broken in out.stdout, broken
    assert f"{len(CONTRACTS) - 5} kept, 5 broken" in out.stdout


def test_every_module_of_jobs_has_its_layer() -> None:
    """A new module of jobs/ is placed in the layers (else nothing checks what it may import)."""
    (layers,) = [c for c in CONTRACTS if c.get("containers") == ["jobs"]]
    placed = {name.strip() for layer in layers["layers"] for name in layer.split("|")}
    modules = {p.stem for p in (ROOT / "jobs").glob("*.py") if p.stem != "__init__"}
    assert modules | {"stages"} == placed


# --------------------------------------------------------------------------------------------------
# Read from the source

HEAVY = ("torch", "transformers", "deepspeed", "safetensors", "tokenizers", "lm_eval", "accelerate")


def _module_name(path: Path) -> str:
    for name, root in PACKAGES.items():
        if path.is_relative_to(root):
            parts = path.relative_to(root).with_suffix("").parts
            return ".".join((name, *parts)).removesuffix(".__init__")
    raise ValueError(path)


SOURCES = {_module_name(p): p for root in PACKAGES.values() for p in sorted(root.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text()) for name, path in SOURCES.items()}


def _top_imports(tree: ast.Module) -> set[str]:
    out = set()
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            continue
        for n in ast.walk(node):
            if isinstance(n, ast.Import):
                out |= {a.name for a in n.names}
            elif isinstance(n, ast.ImportFrom) and n.module:
                out |= {n.module, *(f"{n.module}.{a.name}" for a in n.names)}
    return out


def _heavy(module: str, seen: frozenset[str] = frozenset()) -> bool:
    """Whether importing `module` (one of ours) imports torch or another heavy library on the way."""
    if module not in TREES or module in seen:
        return False
    imports = _top_imports(TREES[module])
    return any(i.split(".")[0] in HEAVY or _heavy(i, seen | {module}) for i in imports)


# Imports of our torch-free modules that stay inside functions, and why.
LATE_IMPORTS = {
    "fusionrun_operator.main.main": "registers the kopf handlers, once the settings are read",
}
LATE_MODULES: set[str] = set()


def _functions(tree: ast.AST, prefix: str):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield f"{prefix}.{node.name}", node
            yield from _functions(node, f"{prefix}.{node.name}")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}.{node.name}")


def test_our_light_modules_are_imported_at_the_top() -> None:
    late = []
    for module, tree in TREES.items():
        if module in LATE_MODULES:
            continue
        for name, fn in _functions(tree, module):
            for n in ast.walk(fn):
                target = n.module if isinstance(n, ast.ImportFrom) else None
                if isinstance(n, ast.Import):
                    target = n.names[0].name
                ours = target is not None and target.split(".")[0] in PACKAGES
                if ours and not _heavy(target) and name not in LATE_IMPORTS:
                    late.append(f"{name}: {target}")
    assert not late, late


# Functions over the limit, left to the engineer restructuring them (issue 23, items 1-2).
LONG_FUNCTIONS: set[str] = set()
MAX_LINES = 80


def test_functions_fit_on_a_screen() -> None:
    long = {
        name: fn.end_lineno - fn.lineno + 1
        for module, tree in TREES.items()
        for name, fn in _functions(tree, module)
        if fn.end_lineno - fn.lineno + 1 > MAX_LINES
    }
    assert set(long) <= LONG_FUNCTIONS, long


# Strings equal to a stage's name that are not the stage (a dataset's split, a shard's split).
NOT_STAGES = {("jobs.corpus", "train"), ("jobs.stages.prepare", "train")}


def test_stage_names_are_spelled_in_the_registry_only() -> None:
    """Adding or renaming a stage is an edit of jobs/registry.py: elsewhere in jobs/ and the operator a
    stage is a `Stage` member or comes from `STAGES` (fusion's shard kinds are fusion's own words)."""
    from jobs.registry import STAGE_NAMES

    spelled = sorted(
        (module, node.value)
        for module, tree in TREES.items()
        if module.startswith(("jobs", "fusionrun_operator")) and module != "jobs.registry"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in STAGE_NAMES
    )
    assert not [s for s in spelled if s not in NOT_STAGES], spelled
