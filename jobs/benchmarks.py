"""Checks of evaluation.tasks and evaluation.taskDirs that name the spec field at fault.

`light_errors` needs PyYAML only (no lm-eval import, no torch): `fusionrun validate` and `fusionrun run` call
it before anything runs. The evaluate stage calls it again on the downloaded task folders, then
`exact_errors` with lm-eval's own index and task loading, all before scoring any model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fusion.benchmarks import (
    TaskDef,
    TaskRequest,
    builtin_names_light,
    load_check,
    missing_files,
    scan_task_dirs,
    task_manager,
    unknown_name_message,
)
from fusion.uris import is_s3, local_path
from jobs.spec import FusionRunSpec


def requests(spec: FusionRunSpec) -> list[TaskRequest]:
    return [TaskRequest(t.name, t.num_fewshot, t.limit) for t in spec.evaluation.tasks]


def local_task_dir(uri: str) -> Path | None:
    """The local folder of a taskDirs entry; None for s3:// (downloaded by the evaluate stage)."""
    return None if is_s3(uri) else local_path(uri)


def dir_errors(dirs: list[Path | None]) -> tuple[list[str], dict[str, TaskDef]]:
    """Problems of the task folders (missing, no YAML, a data file that is not there) and the names they
    define. None entries (not local yet) are skipped."""
    errors: list[str] = []
    index: dict[str, TaskDef] = {}
    for i, d in enumerate(dirs):
        field = f"evaluation.taskDirs[{i}]"
        if d is None:
            continue
        if not d.is_dir():
            errors.append(f"{field}: {d} is not a folder; point it at a folder of task YAMLs and their data")
            continue
        if not any(p.is_file() for p in d.rglob("*.yaml")):
            errors.append(f"{field}: no task YAML (*.yaml) in {d}; add the lm-eval task YAMLs there")
            continue
        found = scan_task_dirs([d])
        for td in found.values():
            for f in missing_files(td.data_files):
                errors.append(
                    f"{field}: task {td.name!r} ({td.yaml_path}) reads data file {f}, which does not exist "
                    "(relative paths are relative to the YAML's folder)"
                )
        index.update(found)
    return errors, index


def light_errors(spec: FusionRunSpec, dirs: list[Path | None] | None = None) -> list[str]:
    """Everything checkable without lm-eval: the folders, their data files, and the task names against the
    folders and (when lm-eval is installed) a text scan of lm-eval's own task names. A name not found there
    is confirmed with lm-eval's real index before it is called unknown. Names are not judged while an
    s3:// folder is not downloaded yet."""
    if not spec.evaluation.tasks:
        return []
    if dirs is None:
        dirs = [local_task_dir(u) for u in spec.evaluation.task_dirs]
    errors, index = dir_errors(dirs)
    if errors or any(d is None for d in dirs):
        return errors
    builtin = builtin_names_light()
    if builtin is None:
        return errors  # lm-eval not installed here: the evaluate stage checks the names
    missing = [
        (i, t.name)
        for i, t in enumerate(spec.evaluation.tasks)
        if t.name not in index and t.name not in builtin
    ]
    if missing:
        known = task_manager([d for d in dirs if d is not None]).all_tasks
        errors += [
            f"evaluation.tasks[{i}].name: {unknown_name_message(n, known)}"
            for i, n in missing
            if n not in known
        ]
    return errors


def exact_errors(spec: FusionRunSpec, manager: Any) -> list[str]:
    """With lm-eval's index (the task folders included): unknown names, then each task built once as lm-eval
    builds it (its data read), so that a task that cannot load fails before any model is scored."""
    known = set(manager.all_tasks)
    errors = []
    for i, req in enumerate(requests(spec)):
        field = f"evaluation.tasks[{i}].name"
        if req.name not in known:
            errors.append(f"{field}: {unknown_name_message(req.name, manager.all_tasks)}")
            continue
        try:
            load_check(req, manager)
        except Exception as err:  # lm-eval and datasets raise many kinds; the message is what matters
            errors.append(f"{field}: task {req.name!r} does not load in lm-eval: {type(err).__name__}: {err}")
    return errors
