"""Generate the offline benchmark suite of examples/tasks/ from the Python standard library's own source.

Three lm-evaluation-harness tasks over local jsonl files (text no one on this project wrote), from modules
that neither training corpus of examples/data/ reads (make_corpus.py, make_code_corpus.py):
  stdlib_docname   multiple choice: a function's docstring (its name blanked out) -> its name among 4, the
                   other 3 functions of the same module
  stdlib_nextline  multiple choice: 8 lines of a function -> the line that follows, among 4 lines of the
                   same module
  stdlib_docs      loglikelihood_rolling: whole docstrings; word/byte perplexity and bits per byte
Deterministic (one seeded RNG; modules and definitions in a fixed order). The data it wrote is committed
(about 110 KB) since the standard library changes between Python versions; data/README.md names the one used.

Run from the repository root: .venv/bin/python examples/tasks/make_tasks.py
"""

from __future__ import annotations

import ast
import json
import random
import re
import runpy
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "data"
USED = set(runpy.run_path(str(DATA / "make_corpus.py"))["MODULES"]) | set(
    runpy.run_path(str(DATA / "make_code_corpus.py"))["MODULES"]
)
MODULES = [
    "ast.py",
    "dis.py",
    "abc.py",
    "operator.py",
    "os.py",
    "posixpath.py",
    "ntpath.py",
    "numbers.py",
    "weakref.py",
    "types.py",
    "linecache.py",
    "traceback.py",
    "warnings.py",
    "platform.py",
    "sysconfig.py",
    "pkgutil.py",
    "plistlib.py",
    "filecmp.py",
    "cmd.py",
    "code.py",
    "codeop.py",
    "pdb.py",
    "bdb.py",
    "mimetypes.py",
    "quopri.py",
    "secrets.py",
    "symtable.py",
    "tabnanny.py",
    "tracemalloc.py",
    "html/parser.py",
    "http/cookies.py",
    "http/server.py",
    "urllib/request.py",
    "email/utils.py",
    "json/encoder.py",
    "json/decoder.py",
    "asyncio/tasks.py",
    "asyncio/queues.py",
    "concurrent/futures/_base.py",
    "multiprocessing/pool.py",
    "xml/dom/minidom.py",
    "pydoc.py",
    "reprlib.py",
    "stringprep.py",
    "sndhdr.py",
    "imghdr.py",
    "chunk.py",
    "pyclbr.py",
    "py_compile.py",
    "compileall.py",
    "zipapp.py",
    "runpy.py",
    "site.py",
    "rlcompleter.py",
]
SIZES = {"docname": 120, "nextline": 100, "docs": 24}  # about 6 min per 135M model on 2 busy cores


def functions(tree: ast.Module) -> list[ast.FunctionDef]:
    """Public functions and methods, in source order."""
    out = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")]
    return sorted(out, key=lambda n: n.lineno)


def docname_items(rng: random.Random, trees: dict[str, ast.Module]) -> list[dict]:
    items = []
    for mod, tree in trees.items():
        funcs = functions(tree)
        names = sorted({f.name for f in funcs})
        for f in funcs:
            doc = ast.get_docstring(f)
            if not doc or len(names) < 4:
                continue
            first = doc.strip().split("\n\n")[0]
            first = re.sub(rf"\b{re.escape(f.name)}\b", "___", first)  # the answer must not be in the text
            if not 60 <= len(first) <= 600:
                continue
            others = rng.sample([n for n in names if n != f.name], 3)
            answer = rng.randrange(4)
            choices = [*others[:answer], f.name, *others[answer:]]
            items.append({"module": mod, "doc": first, "choices": choices, "answer": answer})
    return items


def nextline_items(rng: random.Random, sources: dict[str, str], trees: dict[str, ast.Module]) -> list[dict]:
    items = []
    for mod, tree in trees.items():
        lines = [ln for ln in sources[mod].splitlines() if ln.strip() and not ln.strip().startswith("#")]
        pool = sorted({ln.strip() for ln in lines if 12 <= len(ln.strip()) <= 100})
        for f in functions(tree):
            body = [ln for ln in sources[mod].splitlines()[f.lineno - 1 : f.end_lineno] if ln.strip()]
            if len(body) < 12 or len(pool) < 50:
                continue
            cut = rng.randrange(8, len(body))
            target = body[cut].strip()
            if not 12 <= len(target) <= 100 or '"""' in target or "'''" in target:
                continue
            others = rng.sample([p for p in pool if p != target], 3)
            answer = rng.randrange(4)
            indent = re.match(r"\s*", body[cut]).group(0)
            choices = [indent + c for c in [*others[:answer], target, *others[answer:]]]
            items.append(
                {
                    "module": mod,
                    "context": "\n".join(body[cut - 8 : cut]),
                    "choices": choices,
                    "answer": answer,
                }
            )
    return items


def doc_items(trees: dict[str, ast.Module]) -> list[dict]:
    items = []
    for mod, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                doc = ast.get_docstring(node)
                if doc and 400 <= len(doc) <= 3000:
                    items.append({"module": mod, "text": doc.strip()})
    return items


def main() -> None:
    lib = Path(sysconfig.get_paths()["stdlib"])
    mods = [m for m in MODULES if m not in USED and (lib / m).is_file()]
    sources = {m: (lib / m).read_text(encoding="utf-8") for m in mods}
    trees = {m: ast.parse(s) for m, s in sources.items()}
    rng = random.Random(0)
    sets = {
        "docname": docname_items(rng, trees),
        "nextline": nextline_items(rng, sources, trees),
        "docs": doc_items(trees),
    }
    DATA_OUT = HERE / "data"
    DATA_OUT.mkdir(exist_ok=True)
    for name, items in sets.items():
        picked = sorted(random.Random(1).sample(range(len(items)), min(SIZES[name], len(items))))
        rows = [items[i] for i in picked]
        (DATA_OUT / f"stdlib_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"stdlib_{name}: {len(rows)} of {len(items)} items")
    (DATA_OUT / "README.md").write_text(
        "Generated by examples/tasks/make_tasks.py from the standard library of Python "
        f"{sys.version.split()[0]} (Python Software Foundation License), modules: {', '.join(mods)}.\n"
    )


if __name__ == "__main__":
    main()
