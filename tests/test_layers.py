"""The import layering (pyproject.toml [tool.importlinter]) is checked, and a forbidden import fails it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


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
    assert "4 kept, 0 broken" in out.stdout


def test_a_forbidden_import_breaks_the_build(tmp_path: Path) -> None:
    tree = _copy(tmp_path)
    (tree / "fusion" / "leak.py").write_text("from jobs.store import open_store  # fusion must not\n")
    (tree / "operator" / "fusionrun_operator" / "heavy.py").write_text("import torch\n")
    out = _lint(tree)
    assert out.returncode == 1
    assert "fusion.leak -> jobs.store" in out.stdout
    assert "fusionrun_operator.heavy -> torch" in out.stdout
    assert "2 kept, 2 broken" in out.stdout
