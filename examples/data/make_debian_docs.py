"""Build the prose domain of the two-source evidence from pinned Debian documentation packages (GPL-2+):

- `dev-reference.jsonl`: the Debian Developer's Reference (package `developers-reference`, its reST
  sources), one section per document cut at paragraphs: the training text of the prose expert.
- `debian-reference.txt`: the Debian Reference (package `debian-reference-en`, plain-text edition), its
  prose paragraphs only (tables, command lines and the contents list left out): a held-out prose text
  nobody trains on, by other authors than the training text.
- `code-prose.jsonl`: the two-source runs' training text, every other document of the package code
  (pkg-code.jsonl, from make_pkg_code_corpus.py) and of dev-reference.jsonl, so about the headline's size
  (the same 34 steps are two passes over it), each record with its `domain` (read by bench.evidence's
  MinCE-picks table; the corpus reader takes only `text`).
- `code-unseen.jsonl`, `prose-unseen.jsonl`: per domain the documents that no model of the two-source runs
  trained on (held out of the expert's run and of code-prose.jsonl's training split): the in-domain
  held-out texts of the two-source comparison.

Deterministic for the pinned package versions; nothing generated is committed:

    apt-get install developers-reference debian-reference-en
    .venv/bin/python examples/data/make_debian_docs.py        # -> examples/data/generated/
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

GENERATED = Path(__file__).resolve().parent / "generated"
DEV_REF = Path("/usr/share/developers-reference/_sources")
DEB_REF = Path("/usr/share/debian-reference/debian-reference.en.txt.gz")
PINNED = {"developers-reference": "12.18", "debian-reference-en": "2.100"}
HELDOUT_FRACTION, SPLIT_SEED = 0.15, 0  # corpus.heldoutFraction and corpus.seed of the evidence runs

UNDERLINE = re.compile(r"^([=\-*~^#\"'+])\1{3,}\s*$")  # reST section underline (or overline)
DIRECTIVE = re.compile(r"^\.\. ")  # labels, index entries, comments, directives
ROLE = re.compile(r":[a-z]+:`([^`<]*?)(?:\s*<[^>]*>)?`")  # :ref:`text <target>` -> text
LINK = re.compile(r"`([^`<]+?)\s*<[^>]+>`__?")  # `text <url>`__ -> text
HEADING = re.compile(r"^\d+(\.\d+)+\. \S")  # "1.1.7. How to leave ..." at column 0 (Debian Reference)
NUMBERED = re.compile(r"\b\d+(\.\d+)*\. [A-Z]")  # "3.1. Guiding rules": entries of a contents list


def installed_version(package: str) -> str | None:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def pieces(paragraphs: list[str], max_bytes: int) -> list[str]:
    """Paragraphs joined (one newline between) into pieces of at most max_bytes (a longer one stays whole)."""
    out, cur = [], ""
    for p in paragraphs:
        if cur and len((cur + "\n" + p).encode()) > max_bytes:
            out.append(cur)
            cur = p
        else:
            cur = f"{cur}\n{p}" if cur else p
    return [*out, cur] if cur else out


def rst_sections(text: str) -> list[list[str]]:
    """The reST file's sections, each a list of reflowed paragraphs: headings, labels and directives
    dropped, roles and links reduced to their text."""
    lines = text.splitlines()
    sections: list[list[str]] = [[]]
    para: list[str] = []

    def flush() -> None:
        if para:
            joined = re.sub(r"\s+", " ", " ".join(s.strip() for s in para)).strip()
            joined = LINK.sub(r"\1", ROLE.sub(r"\1", joined)).replace("``", "")
            if joined:
                sections[-1].append(joined)
            para.clear()

    for i, line in enumerate(lines):
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if UNDERLINE.match(nxt) and line.strip() and not UNDERLINE.match(line):
            flush()
            sections.append([])  # a heading starts a section; its title is left out
        elif UNDERLINE.match(line) or DIRECTIVE.match(line) or not line.strip():
            flush()
        else:
            para.append(line)
    flush()
    return [s for s in sections if s]


def prose_paragraphs(text: str) -> list[list[str]]:
    """The Debian Reference's numbered sections as lists of prose paragraphs: a paragraph is kept when it is
    indented text of at least 120 bytes without table rules or shell prompts."""
    body = text[text.find("\n1.1. ") :] if "\n1.1. " in text else text
    sections: list[list[str]] = []
    for block in re.split(r"\n\s*\n", body):
        first = block.lstrip("\n")
        if HEADING.match(first):
            sections.append([])
            continue
        lines = [s.strip() for s in block.splitlines() if s.strip()]
        if not lines or not sections:
            continue
        if any(s[0] in "|+#$" or s.startswith(("...", "Table ", "Figure ")) for s in lines):
            continue
        joined = re.sub(r"\s+", " ", " ".join(lines))
        if len(joined.encode()) >= 120 and len(NUMBERED.findall(joined)) < 3:  # not a contents list
            sections[-1].append(joined)
    return [s for s in sections if s]


def documents(sections: list[list[str]], doc_bytes: int, min_bytes: int, max_bytes: int) -> list[str]:
    out, total = [], 0
    for doc in (p for s in sections for p in pieces(s, doc_bytes)):
        size = len(doc.encode())
        if size < min_bytes:
            continue
        if total + size > max_bytes:
            break
        out.append(doc)
        total += size
    return out


def unseen_documents(code: list[str], prose: list[str]) -> dict[str, list[str]]:
    """Per domain, the documents no model of the two-source runs trained on: held out of its expert's run
    (each expert's corpus split as FusionRun splits it: heldoutFraction 0.15, seed 0, as in
    examples/evidence-pkg-code.yaml) and not in code-prose.jsonl's training split (every other document,
    split the same way)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from jobs.corpus import heldout_split

    n_code = len(code[::2])
    mixed_held = set(heldout_split(n_code + len(prose[::2]), HELDOUT_FRACTION, SPLIT_SEED)[1].tolist())
    out = {}
    for name, docs, first in (("code-unseen", code, 0), ("prose-unseen", prose, n_code)):
        held = heldout_split(len(docs), HELDOUT_FRACTION, SPLIT_SEED)[1].tolist()
        out[name] = [docs[i] for i in held if i % 2 or first + i // 2 in mixed_held]
    return out


def write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-bytes", type=int, default=170_000, help="the prose expert's text (~pkg-code's)")
    ap.add_argument("--heldout-bytes", type=int, default=40_000)
    ap.add_argument("--doc-bytes", type=int, default=1500, help="cut longer sections at paragraphs")
    ap.add_argument("--min-bytes", type=int, default=300)
    ap.add_argument("--out", type=Path, default=GENERATED)
    args = ap.parse_args(argv)
    wrong = {p: installed_version(p) for p, v in PINNED.items() if installed_version(p) != v}
    if wrong or not DEV_REF.is_dir() or not DEB_REF.is_file():
        need = " ".join(f"{p}={PINNED[p]} (found {v})" for p, v in wrong.items())
        print(
            f"error: needs {need or 'the packages'} installed: apt-get install {' '.join(PINNED)}",
            file=sys.stderr,
        )
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    rst = [s for f in sorted(DEV_REF.glob("*.rst.txt")) for s in rst_sections(f.read_text(encoding="utf-8"))]
    prose = documents(rst, args.doc_bytes, args.min_bytes, args.train_bytes)
    write_jsonl(args.out / "dev-reference.jsonl", [{"text": t} for t in prose])
    held = documents(
        prose_paragraphs(gzip.decompress(DEB_REF.read_bytes()).decode("utf-8")),
        args.doc_bytes,
        args.min_bytes,
        args.heldout_bytes,
    )
    (args.out / "debian-reference.txt").write_text("\n\n".join(held) + "\n", encoding="utf-8")
    code_path = args.out / "pkg-code.jsonl"
    if not code_path.is_file():
        print(f"error: {code_path} missing: run examples/data/make_pkg_code_corpus.py first", file=sys.stderr)
        return 1
    code = [json.loads(line)["text"] for line in code_path.read_text(encoding="utf-8").splitlines() if line]
    mixed = [{"text": t, "domain": "code"} for t in code[::2]] + [
        {"text": t, "domain": "prose"} for t in prose[::2]
    ]
    write_jsonl(args.out / "code-prose.jsonl", mixed)
    unseen = unseen_documents(code, prose)
    for name, docs in unseen.items():
        write_jsonl(args.out / f"{name}.jsonl", [{"text": t} for t in docs])
    written = {"dev-reference.jsonl": prose, "debian-reference.txt": held, "code-prose.jsonl": mixed}
    written |= {f"{name}.jsonl": docs for name, docs in unseen.items()}
    for name, docs in written.items():
        print(f"{args.out / name}: {len(docs)} documents")
    return 0


if __name__ == "__main__":
    sys.exit(main())
