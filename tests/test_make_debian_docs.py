"""examples/data/make_debian_docs.py: the prose domain of the two-source evidence, on hand-written inputs."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GEN = runpy.run_path(str(ROOT / "examples" / "data" / "make_debian_docs.py"))

RST = """\
.. _pkgs:

Managing Packages
*****************

This chapter contains information related to creating,
uploading, and maintaining packages.

.. _newpackage:

New packages
============

If you want to create a new package, check the `WNPP list
<https://www.debian.org/devel/wnpp/>`__ first (:ref:`submit-bug`).
Set the subject to ``ITP:`` *foo*.

.. note::

A second paragraph.
"""

TEXT = """\
Contents

1. Disclaimer 2. What is Debian 3. About this document 3.1. Guiding rules

1.1. Console basics

    The shell prompt is where you type commands; this paragraph is long
    enough to be kept as prose text (120 bytes or more).

    # chvt 3

    Table 1.1. List of interesting text-mode program packages

    +---------+
    | package |
    +---------+

    short one.

1.2. Leaving

    You type Ctrl-D at the command prompt to close the shell activity, and you
    return to the login prompt of the console. Or type exit.
"""


def test_rst_sections_drop_headings_labels_and_directives_and_keep_the_text_of_links_and_roles() -> None:
    assert GEN["rst_sections"](RST) == [
        ["This chapter contains information related to creating, uploading, and maintaining packages."],
        [
            "If you want to create a new package, check the WNPP list first (submit-bug). "
            "Set the subject to ITP: *foo*.",
            "A second paragraph.",
        ],
    ]


def test_prose_paragraphs_keep_numbered_sections_prose_only() -> None:
    # The contents list, the command line, the table and its title, and short paragraphs go.
    assert GEN["prose_paragraphs"](TEXT) == [
        [
            "The shell prompt is where you type commands; this paragraph is long enough to be kept as prose "
            "text (120 bytes or more)."
        ],
        [
            "You type Ctrl-D at the command prompt to close the shell activity, and you return to the login "
            "prompt of the console. Or type exit."
        ],
    ]


def test_documents_cut_sections_at_paragraphs_and_stop_at_the_byte_budget() -> None:
    sections = [["a" * 40, "b" * 40, "c" * 40], ["d" * 10], ["e" * 50]]
    # 90 bytes a piece: a+b (81 bytes), then c; d is under the 20-byte minimum; e would pass 150 bytes.
    assert GEN["documents"](sections, 90, 20, 150) == [f"{'a' * 40}\n{'b' * 40}", "c" * 40]
    assert GEN["documents"](sections, 90, 20, 1000)[-1] == "e" * 50


def test_the_mixed_corpus_labels_each_record_with_its_domain(tmp_path, monkeypatch) -> None:
    """main() on stand-in package files: the prose expert's text, the held-out prose and the mixed corpus."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "pkgs.rst.txt").write_text(RST.replace("A second paragraph.", "x" * 400))
    import gzip

    (tmp_path / "ref.txt.gz").write_bytes(
        gzip.compress(TEXT.replace("(120 bytes or more).", "(120 bytes or more). " + "y" * 300).encode())
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "pkg-code.jsonl").write_text(json.dumps({"text": "def f():\n    return 1\n" * 20}) + "\n")
    main = GEN["main"]
    main.__globals__.update(
        DEV_REF=src, DEB_REF=tmp_path / "ref.txt.gz", installed_version=lambda p: GEN["PINNED"][p]
    )
    assert main(["--out", str(out), "--min-bytes", "100"]) == 0
    mixed = [json.loads(line) for line in (out / "code-prose.jsonl").read_text().splitlines()]
    assert [r["domain"] for r in mixed] == ["code", "prose"]  # every other record of each: the first
    assert mixed[1]["text"].startswith("If you want to create a new package") and mixed[1]["text"].endswith(
        "x" * 400
    )
    assert (out / "debian-reference.txt").read_text().startswith("The shell prompt is where")
    main.__globals__.update(installed_version=lambda p: None)
    assert main(["--out", str(out)]) == 1  # the packages not installed: a clear error, nothing written


def test_unseen_documents_are_held_out_of_the_experts_and_of_the_mixed_training_split() -> None:
    from jobs.corpus import heldout_split

    code, prose = [f"c{i}" for i in range(40)], [f"p{i}" for i in range(30)]
    unseen = GEN["unseen_documents"](code, prose)
    mixed = code[::2] + prose[::2]
    mixed_train = {mixed[i] for i in heldout_split(len(mixed), 0.15, 0)[0]}
    for name, docs in (("code-unseen", code), ("prose-unseen", prose)):
        expert_held = {docs[i] for i in heldout_split(len(docs), 0.15, 0)[1]}
        # exactly the expert's held-out documents that are not in the mixed training split
        assert set(unseen[name]) == expert_held - mixed_train and unseen[name], name
