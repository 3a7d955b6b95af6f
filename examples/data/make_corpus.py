"""Generate examples/data/stdlib-docstrings.txt from the Python standard library's own docstrings.

Run from the repository root: .venv/bin/python examples/data/make_corpus.py
"""

import ast
import re
import sysconfig
from pathlib import Path

MODULES = [
    "argparse.py",
    "collections/__init__.py",
    "functools.py",
    "heapq.py",
    "bisect.py",
    "textwrap.py",
    "json/__init__.py",
    "pathlib.py",
    "shutil.py",
    "tempfile.py",
    "random.py",
    "statistics.py",
    "fractions.py",
    "decimal.py",
    "_pydecimal.py",
    "datetime.py",
    "_pydatetime.py",
    "calendar.py",
    "string.py",
    "difflib.py",
    "csv.py",
    "configparser.py",
    "logging/__init__.py",
    "subprocess.py",
    "threading.py",
    "queue.py",
    "contextlib.py",
    "dataclasses.py",
    "enum.py",
    "typing.py",
    "inspect.py",
    "pickle.py",
    "copy.py",
    "pprint.py",
    "zipfile.py",
    "tarfile.py",
    "gzip.py",
    "email/message.py",
    "http/client.py",
    "urllib/parse.py",
    "unittest/case.py",
    "doctest.py",
    "ipaddress.py",
    "uuid.py",
    "base64.py",
    "hashlib.py",
    "hmac.py",
]
DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def main(limit: int = 300_000) -> None:
    lib = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for name in MODULES:
        path = lib / name
        if not path.exists():
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            doc = ast.get_docstring(node) if isinstance(node, DOC_NODES) else None
            if not doc or len(doc) < 200:
                continue
            doc = re.sub(r"\n[ \t]*\n", "\n", doc.strip())  # one docstring = one paragraph = one document
            out.append(doc)
            total += len(doc.encode())
        if total > limit:
            break
    Path("examples/data/stdlib-docstrings.txt").write_text("\n\n".join(out) + "\n", encoding="utf-8")
    print(f"{len(out)} documents, {total} bytes")


if __name__ == "__main__":
    main()
