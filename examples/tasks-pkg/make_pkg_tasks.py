"""Generate the large offline benchmark tasks (thousands of items) from pinned installed packages.

Sixty items cannot tell two 135M models apart (a 2-point difference is one item in 50); these can. With N
items and models that disagree on a fraction d of them, the 95% paired interval of an accuracy difference
is about +-1.96 * sqrt(d / N): +-1.4 points at N = 3,000 and d = 0.15. Three multiple-choice tasks (4
choices each, chance 0.25), over text that FusionRun's evidence training corpus does not contain (none of
the eight packages make_pkg_code_corpus.py trains on, nor the standard library):

  pkg_docname       a function's docstring (its name blanked out as ___) -> its name among 4 functions of
                    the same module (code understanding)
  pkg_nextline      8 lines of a function -> the line that follows, among 4 lines of the same module, with
                    the same indentation (code completion)
  pkg_nextsentence  2 sentences of English prose (a docstring of those packages' code, or a package's
                    description: its README as PyPI shows it) -> the sentence that follows, among 4
                    sentences of the same module's docstrings or the same description

Every package's version is checked against constraints.txt (the project's pins), so the data is the same
on every machine that ran `make setup`; it is generated (`make evidence-data`), not committed (about 3.5 MB),
into examples/tasks-pkg/data/ (a folder of its own, so examples/tasks/ works without it). Deterministic: one
seeded RNG per task, packages and files in order.

    .venv/bin/python examples/tasks-pkg/make_pkg_tasks.py [--items N]
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import re
import runpy
import sys
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OUT = HERE / "data"
CONSTRAINTS = ROOT / "constraints.txt"
STDLIB_TASKS = runpy.run_path(str(HERE.parent / "tasks" / "make_tasks.py"))  # the item builders
TRAINED = set(runpy.run_path(str(ROOT / "examples" / "data" / "make_pkg_code_corpus.py"))["DEFAULT_PACKAGES"])

# import name -> distribution: code of packages the project installs (pinned), none of the training ones
CODE_PACKAGES = {
    "requests": "requests",
    "jinja2": "Jinja2",
    "pyparsing": "pyparsing",
    "urllib3": "urllib3",
    "packaging": "packaging",
    "dateutil": "python-dateutil",
    "anyio": "anyio",
    "mpmath": "mpmath",
    "botocore": "botocore",
    "boto3": "boto3",
    "pydantic": "pydantic",
    "yaml": "PyYAML",
    "attr": "attrs",
    "tqdm": "tqdm",
    "more_itertools": "more-itertools",
    "pandas": "pandas",
    "sklearn": "scikit-learn",
    "datasets": "datasets",
    "nltk": "nltk",
    "numpy": "numpy",
    "fsspec": "fsspec",
    "aiohttp": "aiohttp",
}
SKIP_PARTS = {"tests", "test", "testing", "_vendor", "vendor", "__pycache__", "benchmarks"}
SIZES = {"pkg_docname": 3000, "pkg_nextline": 3000, "pkg_nextsentence": 2000}  # items per task
PER_PACKAGE = 400  # items a package may give a task at most: no package dominates a task
SENTENCE = re.compile(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])")
NOT_PROSE = re.compile(r"^\s*([-*+>|#=~^`<\[!:]|\.\.|\d+\.\s|[A-Za-z_]+\s*[:=(]\S)|[`{}<>|\\]|https?://")


class TaskBuildError(RuntimeError):
    pass


def pins() -> dict[str, str]:
    """Distribution name (lowercase, '-' for '_') -> its pinned version, from constraints.txt."""
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            out[name.strip().lower().replace("_", "-")] = version.strip()
    return out


def checked(dist: str, pinned: dict[str, str]) -> metadata.Distribution:
    """The installed distribution, after checking it is at the project's pin (else the data would differ)."""
    key = dist.lower().replace("_", "-")
    try:
        found = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        raise TaskBuildError(f"{dist} is not installed: run `make setup`") from None
    if key not in pinned:
        raise TaskBuildError(f"{dist} has no pin in constraints.txt: drop it from this script's packages")
    if found.version.split("+")[0] != pinned[key].split("+")[0]:  # a local tag (torch's +cpu) aside
        raise TaskBuildError(
            f"{dist} {found.version} is installed, constraints.txt pins {pinned[key]}: run `make setup`"
        )
    return found


def module_sources(name: str, dist: metadata.Distribution) -> dict[str, tuple[str, ast.Module]]:
    """The package's modules (tests and vendored code left out), path -> (source, its tree), in path order."""
    root = Path(str(dist.locate_file(name)))
    files = sorted(p for p in root.rglob("*.py") if not SKIP_PARTS & set(p.relative_to(root).parts[:-1]))
    out = {}
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
            out[f"{name}/{path.relative_to(root)}"] = (source, ast.parse(source))
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
    return out


def capped(rng: random.Random, items: list[dict], per_package: int) -> list[dict]:
    """At most per_package items of each package (a seeded sample), in their original order."""
    by_package: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_package.setdefault(item["module"].split("/")[0], []).append(i)
    keep = sorted(i for idx in by_package.values() for i in rng.sample(idx, min(per_package, len(idx))))
    return [items[i] for i in keep]


def prose_sentences(description: str) -> list[str]:
    """The plain-prose sentences of a README: paragraphs of ordinary text (no markup, code, tables, links,
    headings, lists), split into sentences of 40-220 characters."""
    out = []
    for para in re.split(r"\n\s*\n", description):
        lines = para.strip().splitlines()
        if not lines or any(NOT_PROSE.search(ln) or ln.startswith((" ", "\t")) for ln in lines):
            continue
        text = " ".join(ln.strip() for ln in lines)
        out += [s for s in SENTENCE.split(text) if 40 <= len(s) <= 220 and s[-1] in ".!?"]
    return out


def docstring_texts(tree: ast.Module) -> list[str]:
    """Every docstring of a module (its own, its classes' and functions'), in source order."""
    nodes = [n for n in ast.walk(tree) if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef)]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    return [d for n in nodes if (d := ast.get_docstring(n))]


def nextsentence_items(rng: random.Random, documents: dict[str, list[str]]) -> list[dict]:
    """Items from groups of texts (a module's docstrings, a package's description): the context and the
    answer come from one text, the 3 other choices from the rest of its group."""
    items = []
    for group, texts in documents.items():
        runs = [sentences for text in texts if len(sentences := prose_sentences(text)) >= 3]
        pool = sorted({s for run in runs for s in run})
        if len(pool) < 8:
            continue
        for run in runs:
            for i in range(2, len(run)):
                target, context = run[i], run[i - 2 : i]
                others = rng.sample([s for s in pool if s != target and s not in context], 3)
                answer = rng.randrange(4)
                choices = [*others[:answer], target, *others[answer:]]
                items.append(
                    {"module": group, "context": " ".join(context), "choices": choices, "answer": answer}
                )
    return items


def build(sizes: dict[str, int]) -> dict[str, list[dict]]:
    pinned = pins()
    parsed: dict[str, tuple[str, ast.Module]] = {}
    for name, dist in CODE_PACKAGES.items():
        if name in TRAINED:
            raise TaskBuildError(f"{name} is in the evidence training corpus: drop it from CODE_PACKAGES")
        parsed.update(module_sources(name, checked(dist, pinned)))
    sources = {m: source for m, (source, _) in parsed.items()}
    trees = {m: tree for m, (_, tree) in parsed.items()}
    prose = {m: docstring_texts(tree) for m, tree in trees.items()}
    for dist in sorted(pinned):
        if dist not in TRAINED and dist not in {"pip", "setuptools", "wheel"}:
            found = checked(dist, pinned)
            prose[dist] = [found.metadata.get_payload() or found.metadata.get("Description") or ""]
    sets = {
        "pkg_docname": STDLIB_TASKS["docname_items"](random.Random(0), trees),
        "pkg_nextline": STDLIB_TASKS["nextline_items"](random.Random(0), sources, trees),
        "pkg_nextsentence": nextsentence_items(random.Random(0), prose),
    }
    out = {}
    for task, items in sets.items():
        items = capped(random.Random(1), items, PER_PACKAGE)
        if len(items) < sizes[task]:
            raise TaskBuildError(f"{task}: {len(items)} items, fewer than the {sizes[task]} asked for")
        out[task] = [items[i] for i in sorted(random.Random(2).sample(range(len(items)), sizes[task]))]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, help=f"items per task (default {SIZES})")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    try:
        tasks = build({t: args.items or n for t, n in SIZES.items()})
    except TaskBuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for task, rows in tasks.items():
        (args.out / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        packages = len({r["module"].split("/")[0] for r in rows})
        print(f"{task}: {len(rows)} items from {packages} packages -> {args.out / task}.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
