"""examples/tasks-pkg/make_pkg_tasks.py: the large offline tasks' items, on hand-written inputs."""

from __future__ import annotations

import random
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GEN = runpy.run_path(str(ROOT / "examples" / "tasks-pkg" / "make_pkg_tasks.py"))

README = """\
Widgets
=======

.. image:: https://example.org/badge.svg

Widgets makes small windows for terminal programs. It draws them with plain characters only.
The library has no dependencies beyond the standard library. Every widget can be nested in another one.

Install it:

    pip install widgets

- a list item that is not prose at all, so it goes.

Colours come from the terminal's own palette. Nothing is drawn until you call the render method.
"""


def test_prose_sentences_keep_plain_paragraphs_and_drop_markup_code_and_lists() -> None:
    assert GEN["prose_sentences"](README) == [
        "Widgets makes small windows for terminal programs.",
        "It draws them with plain characters only.",
        "The library has no dependencies beyond the standard library.",
        "Every widget can be nested in another one.",
        "Colours come from the terminal's own palette.",
        "Nothing is drawn until you call the render method.",
    ]


def test_nextsentence_items_ask_for_the_sentence_that_follows_among_its_groups_sentences() -> None:
    text = " ".join(f"Sentence number {w} of this one paragraph says something plain." for w in "abcdefgh")
    items = GEN["nextsentence_items"](random.Random(0), {"pkg": [text]})
    sentences = GEN["prose_sentences"](text)
    assert len(sentences) == 8 and len(items) == 6  # every sentence after the first two
    for i, item in enumerate(items, start=2):
        assert item["context"] == f"{sentences[i - 2]} {sentences[i - 1]}"
        assert item["choices"][item["answer"]] == sentences[i]
        assert len(set(item["choices"])) == 4 and set(item["choices"]) <= set(sentences)
        assert not set(item["choices"]) & {sentences[i - 2], sentences[i - 1]}  # the context is no choice
    # a group with fewer than 8 sentences gives no item (not enough distinct distractors)
    assert GEN["nextsentence_items"](random.Random(0), {"pkg": [" ".join(sentences[:5])]}) == []


def test_capped_keeps_at_most_n_items_per_package_in_their_order() -> None:
    items = [{"module": f"{p}/m.py", "i": i} for i, p in enumerate("aaaaabbc")]
    out = GEN["capped"](random.Random(1), items, 2)
    assert [x["module"][0] for x in out] == ["a", "a", "b", "b", "c"]
    assert [x["i"] for x in out] == sorted(x["i"] for x in out)


def test_packages_are_checked_against_the_projects_pins() -> None:
    pinned = GEN["pins"]()
    assert pinned["pyyaml"] and pinned["numpy"]  # constraints.txt, names normalised
    GEN["checked"]("PyYAML", pinned)  # installed at its pin by make setup
    with pytest.raises(
        GEN["TaskBuildError"], match=r"PyYAML .* is installed, constraints.txt pins 0\.0: run"
    ):
        GEN["checked"]("PyYAML", {**pinned, "pyyaml": "0.0"})
    with pytest.raises(GEN["TaskBuildError"], match="no-such-dist is not installed: run `make setup`"):
        GEN["checked"]("no-such-dist", pinned)
    with pytest.raises(GEN["TaskBuildError"], match=r"has no pin in constraints\.txt"):
        GEN["checked"]("PyYAML", {})


def test_no_task_reads_the_evidence_training_packages() -> None:
    assert not set(GEN["CODE_PACKAGES"]) & GEN["TRAINED"]
    assert GEN["TRAINED"] >= {"click", "sympy", "rich"}
