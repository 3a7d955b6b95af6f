"""Build an English-prose held-out text from the Debian FAQ (Debian package `debian-faq`, plain-text
edition; GPL-2+): text no one on this project wrote, in neither the code nor the docstring domain.

One document per numbered section ("5.1. What types of applications ..."), cut at paragraphs into pieces
of at most --doc-bytes, its hard-wrapped lines joined back into paragraphs (separated by one newline, so a
text-format reader keeps a piece whole), until `--max-bytes`. Deterministic for a given package version
(pinned). Nothing generated is committed:

    apt-get install debian-faq
    .venv/bin/python examples/data/make_debian_faq_text.py      # -> examples/data/generated/debian-faq.txt
"""

from __future__ import annotations

import argparse
import gzip
import re
import subprocess
import sys
from pathlib import Path

SOURCE = Path("/usr/share/doc/debian/FAQ/debian-faq.en.txt.gz")
PINNED = "11.1"
OUT = Path(__file__).resolve().parent / "generated" / "debian-faq.txt"
CHAPTER = re.compile(r"^Chapter \d+\. .*$", re.M)  # chapter titles between sections
SECTION = re.compile(r"^\d+\.\d+\.\s\S", re.M)  # "1.5. What is ..." at column 0 (a no-break space)


def installed_version() -> str | None:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "debian-faq"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def reflow(section: str) -> str:
    """Join hard-wrapped lines into paragraphs; collapse the indentation; one newline between paragraphs."""
    paragraphs = [" ".join(line.strip() for line in p.splitlines()) for p in re.split(r"\n\s*\n", section)]
    return "\n".join(re.sub(r" {2,}", " ", p).strip() for p in paragraphs if p.strip())


def pieces(section: str, max_bytes: int) -> list[str]:
    """A section cut at paragraph boundaries into pieces of at most max_bytes (a longer paragraph stays
    whole): more, shorter documents for the paired bootstrap."""
    out, cur = [], ""
    for p in section.split("\n"):
        if cur and len((cur + "\n" + p).encode()) > max_bytes:
            out.append(cur)
            cur = p
        else:
            cur = f"{cur}\n{p}" if cur else p
    return [*out, cur] if cur else out


def sections(text: str) -> list[str]:
    text = CHAPTER.sub("", text.replace("\u00a0", " "))
    starts = [m.start() for m in SECTION.finditer(text)]
    return [reflow(text[a:b]) for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-bytes", type=int, default=40_000)
    ap.add_argument("--min-bytes", type=int, default=300)
    ap.add_argument("--doc-bytes", type=int, default=1500, help="cut longer sections at paragraphs")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    version = installed_version()
    if version != PINNED or not SOURCE.is_file():
        print(
            f"error: needs debian-faq {PINNED} installed (found {version}): apt-get install debian-faq",
            file=sys.stderr,
        )
        return 1
    out, total = [], 0
    text = gzip.decompress(SOURCE.read_bytes()).decode("utf-8")
    for doc in (p for s in sections(text) for p in pieces(s, args.doc_bytes)):
        size = len(doc.encode())
        if size < args.min_bytes:
            continue
        if total + size > args.max_bytes:
            break
        out.append(doc)
        total += size
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n\n".join(out) + "\n", encoding="utf-8")
    print(f"{args.out}: {len(out)} documents, {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
