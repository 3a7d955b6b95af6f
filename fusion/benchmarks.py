"""Benchmark tasks through EleutherAI's lm-evaluation-harness (lm-eval, pinned 0.4.13), on models already
loaded in this process.

Three layers, lightest first:
  - task folders read with PyYAML alone (`scan_task_dirs`): the names they define and the local data files
    they read, so that a spec can be checked without importing lm-eval (or torch);
  - scoring (`score_task`): lm-eval's own `simple_evaluate` on an `HFLM` wrapping the model object, per task,
    returning the metrics and their stderr exactly as lm-eval reports them, plus each document's value;
  - paired comparison of two models on the same documents (`paired_difference`), vectorised.

Convention for task folders: a relative path in a task YAML's `dataset_kwargs.data_files` (or a relative
`dataset_path`) is relative to that YAML's folder. lm-eval itself resolves it against the working directory;
FusionRun makes it absolute, so a task folder works wherever it was downloaded to (s3:// task folders).
lm-eval is imported lazily: importing this module costs PyYAML only.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import importlib.util
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

LM_EVAL_VERSION = "0.4.13"  # the pin (pyproject's eval extra); installed_version() is what runs


def installed_version() -> str | None:
    """lm-eval's installed version, None when it is not installed (read without importing it)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return None


class BenchmarkError(ValueError):
    """A task that cannot be scored; the message names the task and what to fix."""


@dataclass(frozen=True)
class TaskRequest:
    """One task to score: an lm-eval task, group or tag name, with its few-shot count and document limit."""

    name: str
    num_fewshot: int = 0
    limit: int | None = None


# --------------------------------------------------------------------------------------------------
# Task folders, read without lm-eval


@dataclass
class TaskDef:
    """A name a task folder defines: a task, a group or a tag, where, and which local files it reads."""

    name: str
    kind: str  # task, group or tag
    yaml_path: Path | None
    data_files: list[str] = field(default_factory=list)  # absolute paths (or globs) it reads


class _TolerantLoader(yaml.SafeLoader):
    """PyYAML's safe loader that reads lm-eval's `!function module.fn` tags as plain strings."""


_TolerantLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def read_task_yaml(path: Path, _seen: frozenset[Path] = frozenset()) -> dict[str, Any]:
    """A task YAML with its `include:` files merged under it (its own keys win), as lm-eval merges them."""
    path = path.resolve()
    if path in _seen:
        raise BenchmarkError(f"{path}: include cycle")
    cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_TolerantLoader)
    if not isinstance(cfg, dict):
        raise BenchmarkError(f"{path}: not a mapping")
    includes = cfg.pop("include", None)
    if includes is None:
        return cfg
    merged: dict[str, Any] = {}
    for inc in includes if isinstance(includes, list) else [includes]:
        sub = read_task_yaml(path.parent / inc, _seen | {path})
        sub.pop("task_list", None)
        merged.update(sub)
    return merged | cfg


def _is_local(p: str) -> bool:
    return "://" not in p and not p.startswith("hf:")


def absolute_data_paths(cfg: dict[str, Any], base: Path) -> dict[str, Any]:
    """`cfg` with relative local `dataset_kwargs.data_files` and a relative local `dataset_path` made
    absolute against `base` (the YAML's folder). Pure: returns a new dict."""
    out = dict(cfg)

    def fix(p: Any) -> Any:
        if isinstance(p, str) and _is_local(p) and not Path(p).is_absolute():
            return str((base / p).resolve())
        return p

    kwargs = out.get("dataset_kwargs")
    if isinstance(kwargs, dict) and "data_files" in kwargs:
        files = kwargs["data_files"]
        if isinstance(files, dict):
            files = {k: [fix(x) for x in v] if isinstance(v, list) else fix(v) for k, v in files.items()}
        elif isinstance(files, list):
            files = [fix(x) for x in files]
        else:
            files = fix(files)
        out["dataset_kwargs"] = {**kwargs, "data_files": files}
    dp = out.get("dataset_path")
    if isinstance(dp, str) and dp.startswith(("./", "../")):
        out["dataset_path"] = fix(dp)
    return out


def local_data_files(cfg: dict[str, Any]) -> list[str]:
    """The local files (or glob patterns) an absolutised task config reads."""
    files = (cfg.get("dataset_kwargs") or {}).get("data_files") if isinstance(cfg, dict) else None
    flat: list[Any] = []
    for v in files.values() if isinstance(files, dict) else [files]:
        flat += v if isinstance(v, list) else [v]
    dp = cfg.get("dataset_path")
    if isinstance(dp, str) and Path(dp).is_absolute():
        flat.append(dp)
    return [x for x in flat if isinstance(x, str) and _is_local(x)]


def missing_files(paths: list[str]) -> list[str]:
    """Those of `paths` that name no file (a glob pattern: that matches nothing)."""
    import glob

    return [p for p in paths if not (glob.glob(p) if re.search(r"[*?\[]", p) else Path(p).exists())]


def scan_task_dirs(dirs: list[Path]) -> dict[str, TaskDef]:
    """Every name the folders define (later folders win, as in lm-eval). Unreadable YAMLs are skipped, as
    lm-eval's index skips them; a YAML without task/group is a shared base (e.g. an include) and defines
    nothing."""
    index: dict[str, TaskDef] = {}
    for d in dirs:
        for path in sorted(Path(d).rglob("*.yaml")):
            if "__pycache__" in path.parts:
                continue
            try:
                cfg = read_task_yaml(path)
            except (OSError, yaml.YAMLError, BenchmarkError):
                continue
            for td in _defs_of(cfg, path):
                if td.kind == "tag" and td.name in index and index[td.name].kind == "tag":
                    continue
                index[td.name] = td
    return index


def _defs_of(cfg: dict[str, Any], path: Path) -> list[TaskDef]:
    if isinstance(cfg.get("group"), str):
        return [TaskDef(cfg["group"], "group", path)]
    if not isinstance(cfg.get("task"), str):
        return []
    files = local_data_files(absolute_data_paths(cfg, path.parent))
    tags = cfg.get("tag") or []
    tags = [tags] if isinstance(tags, str) else tags
    return [TaskDef(cfg["task"], "task", path, files), *(TaskDef(t, "tag", None) for t in tags)]


def task_dir_digest(d: Path) -> str:
    """sha256 over every file of a task folder (relative path and content): what decides its tasks."""
    h = hashlib.sha256()
    for p in sorted(x for x in Path(d).rglob("*") if x.is_file() and "__pycache__" not in x.parts):
        h.update(p.relative_to(d).as_posix().encode() + b"\0")
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def builtin_names_light() -> set[str] | None:
    """Most names lm-eval ships (top-level task/group/tag keys of its YAMLs, scanned as text in under a
    second, without importing it); None when lm-eval is not installed. Misses some (tag lists, generated
    names): a name not found here must be confirmed with `builtin_names` before calling it unknown."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / "tasks"
    pat = re.compile(r"^(?:task|group|tag):[ \t]*['\"]?([^'\"\s#\[{]+)", re.M)
    names: set[str] = set()
    for p in root.rglob("*.yaml"):
        names.update(pat.findall(p.read_text(encoding="utf-8", errors="replace")))
    return names


def task_manager(dirs: list[Path], builtin: bool = True) -> Any:
    """lm-eval's TaskManager over the task folders and, with `builtin`, its own tasks (indexing those ~14k
    YAMLs takes seconds: left out when every requested task is a task of the folders)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(d) for d in dirs] or None, include_defaults=builtin)


def needs_builtin(names: list[str], index: dict[str, TaskDef]) -> bool:
    """Whether lm-eval's own tasks must be indexed: a name the folders do not define as a task (a group or
    tag there may list lm-eval's tasks)."""
    return any(n not in index or index[n].kind != "task" for n in names)


def unknown_name_message(name: str, known: list[str]) -> str:
    """`unknown task 'hellaswg' (did you mean hellaswag?)`, the suggestion from the closest known names."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return (
        f"unknown task {name!r}{hint}: not an lm-eval task, group or tag, nor defined in evaluation.taskDirs"
    )


def task_spec(name: str, manager: Any) -> str | dict[str, Any]:
    """What to hand lm-eval for `name`: the name itself, or, for a task defined by a YAML outside lm-eval's
    own folder, its full config with relative data paths made absolute against that YAML's folder."""
    entry = manager.task_index.get(name)
    path = getattr(entry, "yaml_path", None)
    if entry is None or path is None or getattr(entry.kind, "name", "") != "TASK":
        return name
    builtin = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0])  # type: ignore[union-attr]
    if Path(path).resolve().is_relative_to(builtin.resolve()):
        return name
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's loader: includes and !function resolved

    cfg = load_yaml(path, resolve_func=True)
    fixed = absolute_data_paths(cfg, Path(path).parent)
    return name if fixed == cfg else fixed


def load_check(request: TaskRequest, manager: Any) -> None:
    """Build the task as lm-eval would (reads its data): raises whatever lm-eval raises."""
    manager.load([task_spec(request.name, manager)])


# --------------------------------------------------------------------------------------------------
# Scoring


def private_tokenizer(tokenizer: Any) -> Any:
    """A copy of a tokenizer for HFLM, which sets a missing pad token on it (fusion.hub's are shared)."""
    return copy.deepcopy(tokenizer)


# How wrap_model's LM scores requests; part of each kept task score's key (a change of method rescores).
SCORING = "shared-context"


def wrap_model(model: Any, tokenizer: Any, add_bos: bool | None, max_length: int, batch_size: int) -> Any:
    """lm-eval's HFLM around an already-loaded causal LM, scoring the requests that share a context (the
    choices of a multiple-choice item) from one pass over it. `tokenizer` may be modified
    (private_tokenizer)."""
    from fusion.shared_context import SharedContextLM

    return SharedContextLM(
        pretrained=model,
        tokenizer=tokenizer,
        add_bos_token=add_bos,
        max_length=max_length,
        batch_size=batch_size,
    )


def score_task(lm: Any, request: TaskRequest, manager: Any, bootstrap_iters: int = 100_000) -> dict[str, Any]:
    """One request scored by lm-eval's simple_evaluate with its default seeds (deterministic).

    Returns {"results": {result name: {"samples", "metrics": {metric: {"value", "stderr"}}}},
    "higher_is_better", "num_fewshot", "versions", "per_doc": {result name: {"doc_ids", metric: values}}}:
    a metric is lm-eval's name, with ",<filter>" when its filter is not "none"; stderr is lm-eval's (a
    float, or "N/A" where lm-eval computes none). Groups give their subtasks' results too."""
    from lm_eval import simple_evaluate

    out = simple_evaluate(
        model=lm,
        tasks=[task_spec(request.name, manager)],
        num_fewshot=request.num_fewshot,
        limit=request.limit,
        task_manager=manager,
        log_samples=True,
        bootstrap_iters=bootstrap_iters,
    )
    if out is None:
        raise BenchmarkError(f"task {request.name}: lm-eval returned no results (not rank 0)")
    return {
        "results": {name: parse_result(r) for name, r in out["results"].items()},
        "higher_is_better": _jsonable(out.get("higher_is_better", {})),
        "num_fewshot": _jsonable(out.get("n-shot", {})),
        "versions": _jsonable(out.get("versions", {})),
        "per_doc": {name: per_doc_values(s) for name, s in (out.get("samples") or {}).items()},
    }


def _number(v: Any) -> float | None:
    """JSON-safe: NaN and infinities (which Kubernetes status would refuse) become None."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bool | str) or obj is None:
        return obj
    return _number(obj)


def metric_label(metric: str, filt: str) -> str:
    return metric if filt == "none" else f"{metric},{filt}"


def parse_result(entry: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's flat {"acc,none": v, "acc_stderr,none": s, ...} as {"acc": {"value": v, "stderr": s}}."""
    metrics: dict[str, dict[str, Any]] = {}
    for key, value in entry.items():
        metric, sep, filt = key.partition(",")
        if not sep or metric.endswith("_stderr"):
            continue
        stderr = entry.get(f"{metric}_stderr,{filt}")
        metrics[metric_label(metric, filt)] = {
            "value": _number(value),
            "stderr": stderr if isinstance(stderr, str) else _number(stderr),
        }
    # The order lm-eval reports them in (its first is the task's main metric), kept apart: JSON sorts keys.
    return {"samples": entry.get("sample_len"), "metric_names": list(metrics), "metrics": metrics}


def per_doc_values(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Each document's value of each metric (what lm-eval aggregates), ordered by doc_id: a number, or a
    [numerator, weight] pair (log-likelihood and words/bytes of the perplexity metrics). Metrics of other
    shapes (e.g. references and predictions of F1 or BLEU) are left out."""
    rows = sorted(samples, key=lambda s: (s.get("filter", "none"), s["doc_id"]))
    out: dict[str, Any] = {}
    for s in rows:
        filt = s.get("filter", "none")
        for metric in s.get("metrics", []):
            v = s.get(metric)
            if isinstance(v, bool | int | float | np.number):
                item: Any = float(v)
            elif isinstance(v, list | tuple) and len(v) == 2 and all(isinstance(x, int | float) for x in v):
                item = [float(v[0]), float(v[1])]
            else:
                continue
            out.setdefault(metric_label(metric, filt), []).append(item)
    ids = sorted({s["doc_id"] for s in rows})
    return {"doc_ids": ids, **{k: v for k, v in out.items() if len(v) == len(ids)}}


# --------------------------------------------------------------------------------------------------
# Paired comparison of two models on the same documents


def _aggregate(metric: str) -> tuple[str, Any] | None:
    """How lm-eval aggregates a metric's per-document pairs: (kind, transform of sum(num)/sum(weight))."""
    base = metric.partition(",")[0]
    if base == "bits_per_byte":
        return "pairs", lambda x: x / math.log(2)
    if base.endswith("perplexity"):
        return "pairs", np.exp
    return None


def metric_from_docs(values: list[Any], metric: str) -> float | None:
    """The aggregate of per-document values as lm-eval computes it (mean, or the weighted log-likelihood
    forms); None for a shape it cannot tell."""
    if not values:
        return None
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 1:
        return float(arr.mean())
    agg = _aggregate(metric)
    if agg is None or arr.shape[1] != 2:
        return None
    return float(agg[1](-arr[:, 0].sum() / arr[:, 1].sum()))


def paired_difference(
    a: list[Any], b: list[Any], metric: str, samples: int = 10_000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float] | None:
    """A's aggregate minus B's on the same documents, with a paired bootstrap interval (documents resampled
    with replacement; the central `level` share). None when the values' shape has no known aggregate."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.size == 0:
        return None
    if x.ndim == 1:
        num_a, num_b, w, transform = x, y, np.ones_like(x), (lambda v: v)
    else:
        agg = _aggregate(metric)
        if agg is None:
            return None
        num_a, num_b, w, transform = -x[:, 0], -y[:, 0], x[:, 1], agg[1]
    delta = float(transform(num_a.sum() / w.sum()) - transform(num_b.sum() / w.sum()))
    rng = np.random.default_rng(seed)
    n = num_a.size
    chunk = max(1, 4_000_000 // n)  # bounded memory: samples x n indices, a chunk at a time
    diffs = []
    for start in range(0, samples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, samples - start), n))
        sw = w[idx].sum(axis=1)
        diffs.append(transform(num_a[idx].sum(axis=1) / sw) - transform(num_b[idx].sum(axis=1) / sw))
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(np.concatenate(diffs), [tail, 1.0 - tail])
    return delta, float(lo), float(hi)
