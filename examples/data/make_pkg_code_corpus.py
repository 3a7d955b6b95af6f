"""Build a code corpus from the Python sources of pinned, permissively licensed packages installed in the
project's virtual environment (they come with its dependencies): text no one on this project wrote.

One document per top-level function or class (decorators, comments and docstrings kept, as written); a
class too long for one document gives one document per method instead (dedented). Files are read in
sorted order, tests and vendored copies skipped, and each package contributes up to `--per-package` bytes,
so the output is the same on every machine with the same package versions. The versions are pinned:
another installed version stops the build (the corpus would silently change).

Output: JSONL, {"text": ..., "origin": "<package>/<file>:<name>"} per line (JSONL keeps the blank lines
inside code; a FusionRun reads it with corpus.format jsonl). Nothing generated is committed:

    .venv/bin/python examples/data/make_pkg_code_corpus.py            # -> examples/data/generated/
    .venv/bin/python examples/data/make_pkg_code_corpus.py --per-package 12000 --out /tmp/probe.jsonl
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import textwrap
from importlib import metadata
from pathlib import Path

# import name -> (distribution, pinned version, licence). Pure-Python code of varied style.
PACKAGES: dict[str, tuple[str, str, str]] = {
    "requests": ("requests", "2.34.2", "Apache-2.0"),
    "click": ("click", "8.5.1", "BSD-3-Clause"),
    "jinja2": ("jinja2", "3.1.6", "BSD-3-Clause"),
    "werkzeug": ("werkzeug", "3.1.9", "BSD-3-Clause"),
    "pyparsing": ("pyparsing", "3.3.3", "MIT"),
    "networkx": ("networkx", "3.6.1", "BSD-3-Clause"),
    "sympy": ("sympy", "1.14.0", "BSD-3-Clause"),
    "rich": ("rich", "15.0.0", "MIT"),
    "pygments": ("pygments", "2.21.0", "BSD-2-Clause"),
    "urllib3": ("urllib3", "2.8.0", "MIT"),
    "jsonschema": ("jsonschema", "4.26.0", "MIT"),
    "packaging": ("packaging", "26.4", "Apache-2.0 OR BSD-2-Clause"),
    "dateutil": ("python-dateutil", "2.9.0.post0", "Apache-2.0 AND BSD-3-Clause"),
    "anyio": ("anyio", "4.16.0", "MIT"),
    "mpmath": ("mpmath", "1.3.0", "BSD-3-Clause"),
    "kopf": ("kopf", "1.45.2", "MIT"),
}
# The eight where Gemma-3-270M beat SmolLM2-135M by the most in a 5 KB-per-package probe (5.4-9.3% fewer
# bits per byte; docs/evidence-notes.md): a domain where the source knows more than the target.
DEFAULT_PACKAGES = ("click", "pygments", "kopf", "sympy", "jsonschema", "networkx", "werkzeug", "rich")
SKIP_PARTS = {"tests", "test", "testing", "_vendor", "vendor", "__pycache__", "benchmarks"}
DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
OUT = Path(__file__).resolve().parent / "generated" / "pkg-code.jsonl"


class CorpusBuildError(RuntimeError):
    pass


def package_dir(name: str) -> Path:
    """The installed folder of an import name, after checking the pinned distribution version."""
    dist, pinned, _ = PACKAGES[name]
    try:
        installed = metadata.version(dist)
    except metadata.PackageNotFoundError:
        raise CorpusBuildError(f"{dist} is not installed: `pip install {dist}=={pinned}`") from None
    if installed != pinned:
        raise CorpusBuildError(
            f"{dist} {installed} is installed, the corpus is pinned to {pinned}: install {dist}=={pinned}, "
            "or update PACKAGES (the corpus then changes: regenerate every run's inputs)"
        )
    files = metadata.distribution(dist).locate_file(name)
    return Path(str(files))


def source_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if not SKIP_PARTS & set(p.relative_to(root).parts[:-1]))


def segment(lines: list[str], node: ast.AST) -> str:
    """The node's source lines, decorators included, dedented."""
    first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
    return textwrap.dedent("\n".join(lines[first - 1 : node.end_lineno])).strip("\n")


def documents_of(source: str, min_bytes: int, max_bytes: int) -> list[tuple[str, str]]:
    """(name, text) of each top-level definition within the size bounds; a class over max_bytes gives
    its methods instead."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    lines = source.splitlines()
    out = []
    for node in tree.body:
        if not isinstance(node, DEFS):
            continue
        text = segment(lines, node)
        size = len(text.encode())
        if size > max_bytes and isinstance(node, ast.ClassDef):
            parts = [(f"{node.name}.{m.name}", segment(lines, m)) for m in node.body if isinstance(m, DEFS)]
        else:
            parts = [(node.name, text)]
        out += [(n, t) for n, t in parts if min_bytes <= len(t.encode()) <= max_bytes]
    return out


def build(packages: list[str], per_package: int, min_bytes: int, max_bytes: int) -> list[dict[str, str]]:
    docs = []
    for name in packages:
        root = package_dir(name)
        total = 0
        for path in source_files(root):
            source = path.read_text(encoding="utf-8", errors="strict")
            for def_name, text in documents_of(source, min_bytes, max_bytes):
                if total >= per_package:
                    break
                docs.append({"text": text, "origin": f"{name}/{path.relative_to(root)}:{def_name}"})
                total += len(text.encode())
            if total >= per_package:
                break
    return docs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packages", nargs="*", default=list(DEFAULT_PACKAGES), choices=sorted(PACKAGES))
    ap.add_argument("--per-package", type=int, default=19_000, help="bytes of text per package at most")
    ap.add_argument("--min-bytes", type=int, default=300)
    ap.add_argument("--max-bytes", type=int, default=3000)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    try:
        docs = build(args.packages, args.per_package, args.min_bytes, args.max_bytes)
    except CorpusBuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    size = sum(len(d["text"].encode()) for d in docs)
    print(f"{args.out}: {len(docs)} documents, {size} bytes from {len(args.packages)} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
