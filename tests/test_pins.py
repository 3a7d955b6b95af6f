"""constraints.txt is the one list of exact versions: scripts/setup.sh installs with it (pip -c), both
Dockerfile images install with it, and this file checks it against pyproject.toml's ranges and against the
environment the tests run in. `make pins` (scripts/update-pins.sh) moves it forward.

The checks are pure functions returning problems, each also shown to catch a bad file."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PINS = ROOT / "constraints.txt"
EXTRAS = ("jobs", "operator", "test", "eval")


def parse_pins(text: str) -> dict[str, str]:
    """name -> version of every `name==version` line; anything else but comments is an error."""
    pins: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][\w.]*)", line)
        if not m:
            raise ValueError(f"constraints.txt line {n}: {line!r} is not an exact name==version pin")
        name = canonicalize_name(m.group(1))
        if name in pins:
            raise ValueError(f"constraints.txt line {n}: {m.group(1)} is pinned twice")
        pins[name] = m.group(2)
    return pins


def check_ranges(pins: dict[str, str], requirements: list[Requirement]) -> list[str]:
    """Each requirement of pyproject.toml has a pin, inside its range."""
    problems = []
    for req in requirements:
        pin = pins.get(canonicalize_name(req.name))
        if pin is None:
            problems.append(f"{req.name}: no pin in constraints.txt for {req} (run `make pins`)")
        elif not req.specifier.contains(pin, prereleases=True):
            problems.append(
                f"{req.name}: constraints.txt pins {pin}, outside pyproject.toml's {req} "
                "(widen the range or run `make pins`)"
            )
    return problems


def check_installed(pins: dict[str, str], installed: dict[str, str]) -> list[str]:
    """Every distribution the project pulls in is installed at its pin (local labels such as +cpu aside)."""
    problems = []
    for name, version in sorted(installed.items()):
        pin = pins.get(name)
        if pin is None:
            problems.append(
                f"{name} {version} is installed but not pinned in constraints.txt (run `make pins`)"
            )
        elif version.split("+")[0] != pin:
            problems.append(f"{name}: constraints.txt pins {pin}, installed is {version} (run `make setup`)")
    return problems


def project_requirements(pyproject: dict) -> list[Requirement]:
    reqs = [Requirement(r) for r in pyproject["project"]["dependencies"]]
    for extra in EXTRAS:
        reqs += [Requirement(r) for r in pyproject["project"]["optional-dependencies"][extra]]
    return reqs


def installed_closure(requirements: list[Requirement]) -> dict[str, str]:
    """name -> installed version of every distribution reachable from `requirements`, extras followed."""
    seen: dict[str, str] = {}
    todo = [(r.name, frozenset(r.extras)) for r in requirements]
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if (key, extras) in done:
            continue
        done.add((key, extras))
        try:
            dist = importlib.metadata.distribution(key)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional dependency for another platform or Python
        seen[key] = dist.version
        for r in map(Requirement, dist.requires or []):
            envs = [{"extra": e} for e in ("", *extras)]
            if r.marker is None or any(r.marker.evaluate(env) for env in envs):
                todo.append((r.name, frozenset(r.extras)))
    return seen


@pytest.fixture(scope="module")
def pins() -> dict[str, str]:
    return parse_pins(PINS.read_text())


@pytest.fixture(scope="module")
def requirements() -> list[Requirement]:
    return project_requirements(tomllib.loads((ROOT / "pyproject.toml").read_text()))


def test_every_requirement_is_pinned_inside_its_range(pins, requirements):
    assert check_ranges(pins, requirements) == []
    assert pins["torch"] == "2.13.0"  # the CPU wheel here, the CUDA one in the job image: same version


def test_the_environment_is_the_pinned_one(pins, requirements):
    closure = installed_closure(requirements)
    assert {"kopf", "torch", "lm-eval", "botocore", "pytest", "ruff"} <= closure.keys()
    assert check_installed(pins, closure) == []


def test_checks_name_the_package_and_the_fix():
    reqs = [Requirement("boto3>=1.35,<2"), Requirement("kopf>=1.44,<2"), Requirement("ruff>=0.6")]
    assert check_ranges({"boto3": "1.44.8", "kopf": "2.0.0"}, reqs) == [
        "kopf: constraints.txt pins 2.0.0, outside pyproject.toml's kopf<2,>=1.44 "
        "(widen the range or run `make pins`)",
        "ruff: no pin in constraints.txt for ruff>=0.6 (run `make pins`)",
    ]
    # A new release installed over the pins (the defect this file exists for) is named.
    assert check_installed(
        {"boto3": "1.44.8", "torch": "2.13.0"}, {"boto3": "1.44.18", "torch": "2.13.0+cpu"}
    ) == ["boto3: constraints.txt pins 1.44.8, installed is 1.44.18 (run `make setup`)"]
    assert check_installed({}, {"regex": "2026.12.2"}) == [
        "regex 2026.12.2 is installed but not pinned in constraints.txt (run `make pins`)"
    ]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("boto3>=1.44\n", "line 1: 'boto3>=1.44' is not an exact name==version pin"),
        ("boto3==1.44.8\nBoto3==1.44.9\n", "line 2: Boto3 is pinned twice"),
    ],
)
def test_parse_rejects_ranges_and_duplicates(text, error):
    with pytest.raises(ValueError, match=re.escape(error)):
        parse_pins(text)


def test_parse_normalises_names_and_skips_comments():
    assert parse_pins("# header\nPyYAML==6.0.4  # note\nlm_eval==0.4.13\n\n") == {
        "pyyaml": "6.0.4",
        "lm-eval": "0.4.13",
    }


def test_setup_and_update_read_the_one_file():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "PINS=constraints.txt" in setup and 'install -c "$PINS" --build-constraint "$PINS"' in setup
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^pins:.*\n\tbash scripts/update-pins.sh", makefile, re.M)
    update = (ROOT / "scripts" / "update-pins.sh").read_text()
    assert ">constraints.txt.new" in update and "make test" in update
