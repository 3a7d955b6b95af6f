"""Generate examples/data/stdlib-code.txt: Python source of standard-library modules that the docstring
corpus (make_corpus.py) does not draw from, one top-level function or class per document, docstrings
removed. An out-of-domain held-out text for evaluation (evaluation.corpora): code, where the training text
is mostly prose.

Run from the repository root: .venv/bin/python examples/data/make_code_corpus.py
"""

import ast
import runpy
import sysconfig
from pathlib import Path

DOCSTRING_MODULES = runpy.run_path(str(Path(__file__).with_name("make_corpus.py")))["MODULES"]

MODULES = [
    "sched.py",
    "selectors.py",
    "socketserver.py",
    "wave.py",
    "colorsys.py",
    "graphlib.py",
    "shlex.py",
    "fnmatch.py",
    "glob.py",
    "netrc.py",
    "mailbox.py",
    "imaplib.py",
    "ftplib.py",
    "smtplib.py",
    "getopt.py",
    "optparse.py",
    "gettext.py",
    "locale.py",
    "codecs.py",
    "tokenize.py",
    "trace.py",
    "timeit.py",
]
DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def without_docstrings(source: str, node: ast.AST) -> str:
    """The node's source with every docstring line range inside it removed (other lines untouched)."""
    lines = source.splitlines()[node.lineno - 1 : node.end_lineno]
    drop: set[int] = set()
    for n in ast.walk(node):
        body = getattr(n, "body", None)
        if (
            isinstance(n, (*DEFS, ast.Module))
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            drop.update(range(body[0].lineno, body[0].end_lineno + 1))
    return "\n".join(line for i, line in enumerate(lines, node.lineno) if i not in drop and line.strip())


def main(limit: int = 40_000) -> None:
    assert not set(MODULES) & set(DOCSTRING_MODULES), "held-out code must come from other modules"
    lib = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for name in MODULES:
        path = lib / name
        if not path.exists():
            continue
        source = path.read_text(encoding="utf-8")
        for node in ast.parse(source).body:
            if not isinstance(node, DEFS):
                continue
            text = without_docstrings(source, node)
            if not 300 <= len(text) <= 3000:
                continue
            out.append(text)
            total += len(text.encode())
            if total > limit:
                break
        if total > limit:
            break
    Path("examples/data/stdlib-code.txt").write_text("\n\n".join(out) + "\n", encoding="utf-8")
    print(f"{len(out)} documents, {total} bytes")


if __name__ == "__main__":
    main()
