"""Benchmark tasks through lm-evaluation-harness: task folders read without lm-eval, the paired comparison by
hand, and the evaluate stage scoring real lm-eval tasks (multiple choice and loglikelihood_rolling over
local jsonl files the tests write) on tiny random-init models, checked against lm-eval called directly on
the same models; bad input fails before scoring; finished scores survive a failure; reruns score only what
is missing."""

from __future__ import annotations

import inspect
import json
import math
import textwrap
from pathlib import Path

import pytest
import yaml

from fusion.benchmarks import (
    absolute_data_paths,
    metric_from_docs,
    paired_difference,
    scan_task_dirs,
)
from jobs.benchmarks import light_errors
from jobs.settings import Settings
from jobs.spec import parse_spec
from tests.conftest import MISTRAL_URI, QWEN_URI

MC_YAML = """\
task: stdlib_pick
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/pick.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{doc}}\\nThe function documented above is:"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
PPL_YAML = """\
task: stdlib_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/text.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def _stdlib_functions() -> list:
    import json as j
    import os.path
    import shutil as sh
    import textwrap as tw

    return [
        j.dumps,
        j.loads,
        tw.wrap,
        tw.dedent,
        inspect.getsource,
        inspect.signature,
        sh.copyfile,
        os.path.join,
    ]


def write_tasks(root: Path) -> Path:
    """A task folder: stdlib_pick (pick the documented function among 4, 8 questions) and stdlib_ppl (3
    docstrings scored whole), over jsonl files of CPython docstrings (text no one here wrote)."""
    funcs = _stdlib_functions()
    names = [f"{f.__module__}.{f.__name__}" for f in funcs]
    (root / "data").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, f in enumerate(funcs):
        others = [n for n in names if n != names[i]][i % 5 : i % 5 + 3]
        answer = i % 4
        choices = [*others[:answer], names[i], *others[answer:]]
        first = textwrap.dedent(f.__doc__ or "").strip().split("\n\n")[0]
        rows.append({"doc": first, "choices": choices, "answer": answer})
    (root / "data" / "pick.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [textwrap.dedent(f.__doc__ or "").strip()[:400] for f in funcs[:3]]
    (root / "data" / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (root / "pick.yaml").write_text(MC_YAML)
    (root / "ppl.yaml").write_text(PPL_YAML)
    return root


# --------------------------------------------------------------------------------------------------
# Task folders without lm-eval


def test_scan_reads_names_includes_and_data_paths(tmp_path: Path) -> None:
    tasks = write_tasks(tmp_path / "tasks")
    (tasks / "_base.yaml").write_text("dataset_path: json\noutput_type: multiple_choice\n")
    (tasks / "more.yaml").write_text(
        "include: _base.yaml\ntask: more\ntag: [stdlib_all]\nprocess_docs: !function utils.process\n"
        "dataset_kwargs: {data_files: {test: [data/pick.jsonl, /abs/x.jsonl]}}\n"
    )
    index = scan_task_dirs([tasks])
    assert {n: d.kind for n, d in index.items()} == {
        "stdlib_pick": "task",
        "stdlib_ppl": "task",
        "more": "task",
        "stdlib_all": "tag",
    }
    assert index["stdlib_pick"].data_files == [str((tasks / "data" / "pick.jsonl").resolve())]
    assert index["more"].data_files == [str((tasks / "data" / "pick.jsonl").resolve()), "/abs/x.jsonl"]
    cfg = {"dataset_path": "./local", "dataset_kwargs": {"data_files": "a.jsonl", "field": "x"}}
    fixed = absolute_data_paths(cfg, Path("/t"))
    assert fixed == {"dataset_path": "/t/local", "dataset_kwargs": {"data_files": "/t/a.jsonl", "field": "x"}}
    assert cfg["dataset_kwargs"]["data_files"] == "a.jsonl"  # pure
    hub = {"dataset_path": "allenai/ai2_arc", "dataset_kwargs": {"data_files": "hf://datasets/x/y.json"}}
    assert absolute_data_paths(hub, Path("/t")) == hub


def test_paired_difference_by_hand() -> None:
    # Accuracy: A right on docs 0, 2, 3; B on 2, 3: +0.25. Resampling 4 docs of differences [1, 0, 0, 0].
    d = paired_difference([1, 0, 1, 1], [0, 0, 1, 1], "acc")
    assert d is not None and d[0] == 0.25 and 0.0 <= d[1] <= 0.25 <= d[2] <= 1.0
    # Same difference in every document: the interval collapses onto it.
    assert paired_difference([1.0, 0.5], [0.5, 0.0], "acc") == (0.5, 0.5, 0.5)
    # Bits per byte from (log-likelihood, bytes): A 8 and 4 bits over 4 bytes each = 1.5; B 4 and 4 = 1.0.
    # Resamples: both doc 0 -> (16 - 8) / 8 = 1; both doc 1 -> 0; one each -> 0.5: 95% interval [0, 1].
    ln2 = math.log(2)
    a, b = [[-8 * ln2, 4], [-4 * ln2, 4]], [[-4 * ln2, 4], [-4 * ln2, 4]]
    assert paired_difference(a, b, "bits_per_byte") == pytest.approx((0.5, 0.0, 1.0))
    assert metric_from_docs(a, "bits_per_byte") == pytest.approx(1.5)
    assert metric_from_docs(a, "byte_perplexity") == pytest.approx(2**1.5)
    assert metric_from_docs([1, 0, 1, 0], "acc") == 0.5
    assert paired_difference([[1, 2]], [[1, 3]], "f1") is None  # pairs of an unknown aggregate: no interval


def test_a_task_is_scored_only_on_the_models_it_names(tmp_path: Path, monkeypatch) -> None:
    """evaluation.tasks[].models: score_model skips the tasks that leave a model out (nothing scored, nothing
    written for them) and scores the rest; without models every task is scored on every model."""
    from types import SimpleNamespace

    from fusion.benchmarks import TaskRequest
    from jobs.stages import evaluate_tasks
    from jobs.stages.evaluate_tasks import TaskPlan, score_model
    from jobs.store import LocalStore

    scored = []

    def fake_score(lm, req, manager):
        scored.append((lm, req.name))
        return {"results": {req.name: {"metrics": {"acc": {"value": 0.5}}}}}

    monkeypatch.setattr(evaluate_tasks, "model_identity", lambda ctx, label: {"model": label})
    monkeypatch.setattr(evaluate_tasks, "wrap_model", lambda model, *args: model)
    monkeypatch.setattr(evaluate_tasks, "score_task", fake_score)
    store = LocalStore(tmp_path)
    ctx = SimpleNamespace(
        store=store,
        task=SimpleNamespace(id="evaluate"),
        put_json=lambda key, doc: store.put_bytes(key, json.dumps(doc).encode()),
    )
    reqs = [TaskRequest("cheap"), TaskRequest("costly")]
    plan = TaskPlan(reqs, None, {"cheap": "d", "costly": "d"}, 64, 1, {"costly": ["fused", "clm"]})
    assert [plan.scores("costly", m) for m in ("fused", "clm", "target-before")] == [True, True, False]
    assert set(score_model(ctx, plan, "target-before", "m0", None, None)) == {"cheap"}
    assert set(score_model(ctx, plan, "fused", "m1", None, None)) == {"cheap", "costly"}
    assert scored == [("m0", "cheap"), ("m1", "cheap"), ("m1", "costly")]
    kept = json.loads(store.get_bytes("evaluate/tasks/target-before.json"))
    assert set(kept["tasks"]) == {"cheap"}
    every = TaskPlan(reqs, None, {"cheap": "d", "costly": "d"}, 64, 1)
    assert all(every.scores(r.name, "source:src") for r in reqs)


def test_tasks_block_and_summary_by_hand() -> None:
    from fusion.benchmarks import TaskRequest
    from jobs.stages.evaluate_tasks import task_summary, tasks_block

    def entry(acc: float, docs: list[float], bpb: float, pairs: list[list[float]]) -> dict:
        return {
            "results": {
                "pick": {
                    "samples": 4,
                    "metric_names": ["acc"],
                    "metrics": {"acc": {"value": acc, "stderr": 0.25}},
                },
                "ppl": {
                    "samples": 2,
                    "metric_names": ["bits_per_byte"],
                    "metrics": {"bits_per_byte": {"value": bpb, "stderr": "N/A"}},
                },
            },
            "higher_is_better": {"pick": {"acc": True}},
            "num_fewshot": {"pick": 0, "ppl": 0},
            "per_doc": {
                "pick": {"doc_ids": [0, 1, 2, 3], "acc": docs},
                "ppl": {"doc_ids": [0, 1], "bits_per_byte": pairs},
            },
        }

    ln2 = math.log(2)
    scores = {
        "target-before": {"grp": entry(0.25, [0, 0, 0, 1], 2.0, [[-8 * ln2, 4], [-8 * ln2, 4]])},
        "fused": {"grp": entry(0.75, [1, 1, 0, 1], 1.5, [[-8 * ln2, 4], [-4 * ln2, 4]])},
        "clm": {"grp": entry(0.5, [1, 0, 0, 1], 1.0, [[-4 * ln2, 4], [-4 * ln2, 4]])},
        "self": {"grp": entry(0.5, [0, 1, 0, 1], 1.5, [[-8 * ln2, 4], [-4 * ln2, 4]])},
    }
    block = tasks_block([TaskRequest("grp")], scores)
    assert set(block) == {"pick", "ppl"}
    # Every trained baseline gets its comparison; the target before training is no baseline. FuseLLM minus
    # self-distillation per item: [1, 0, 0, 0]. Means of 4 resampled items: P(0) = (3/4)^4 = 0.32 > 2.5%,
    # P(>= 0.75) = 0.051 > 2.5% > P(1) = 0.004: the 95% interval is [0, 0.75].
    assert {k for k in block["pick"] if k.startswith("fused_minus_")} == {
        "fused_minus_clm",
        "fused_minus_self",
    }
    assert block["pick"]["fused_minus_self"]["acc"] == {"delta": 0.25, "ci95_low": 0.0, "ci95_high": 0.75}
    assert block["ppl"]["fused_minus_self"]["bits_per_byte"] == {
        "delta": 0.0,
        "ci95_low": 0.0,
        "ci95_high": 0.0,
    }
    assert block["pick"]["models"]["fused"] == {"acc": {"value": 0.75, "stderr": 0.25}}
    assert block["pick"]["fused_minus_clm"]["acc"]["delta"] == 0.25
    assert block["ppl"]["models"]["clm"]["bits_per_byte"]["stderr"] == "N/A"
    assert block["ppl"]["fused_minus_clm"]["bits_per_byte"] == {
        "delta": 0.5,
        "ci95_low": 0.0,
        "ci95_high": 1.0,
    }
    # A per-document list that does not give lm-eval's figure gets no interval (only the difference).
    scores["fused"]["grp"]["per_doc"]["pick"]["acc"] = [1, 1, 1, 1]
    assert tasks_block([TaskRequest("grp")], scores)["pick"]["fused_minus_clm"]["acc"] == {"delta": 0.25}
    # "grp" itself is no result name (a group would be one): summary rows only for names lm-eval reported
    assert task_summary(block, [TaskRequest("grp")]) == {}
    assert task_summary(block, [TaskRequest("pick")]) == {
        "pick": {
            "metric": "acc",
            "target-before": 0.25,
            "fused": 0.75,
            "clm": 0.5,
            "self": 0.5,
            "fused_minus_clm": 0.25,
            "fused_minus_self": 0.25,
        }
    }


# --------------------------------------------------------------------------------------------------
# Bad input at `fusionrun validate` (no lm-eval import unless a name must be confirmed unknown)


def _spec(tmp_path: Path, tasks: list[dict], task_dirs: list[str], source_tok: str = MISTRAL_URI) -> dict:
    corpus = tmp_path / "corpus.txt"
    docs = [textwrap.dedent(f.__doc__ or "").strip() for f in _stdlib_functions()]
    corpus.write_text("\n\n".join(d for d in docs if d))
    tiny = {"hiddenSize": 32, "numLayers": 1, "numHeads": 2}
    return {
        "target": {"name": "tgt", "tokenizer": MISTRAL_URI, "randomInit": {"architecture": "llama", **tiny}},
        "sources": [
            {
                "name": "src",
                "tokenizer": source_tok,
                "randomInit": {"architecture": "qwen2", **tiny, "seed": 3},
            }
        ],
        "corpus": {"uri": str(corpus), "heldoutFraction": 0.25},
        "extraction": {"maxLength": 128, "batchTokens": 1024, "device": "cpu", "dtype": "float32"},
        "training": {"seqLen": 64, "clmBaseline": True},
        "evaluation": {"tasks": tasks, "taskDirs": task_dirs},
        "store": {"uri": str(tmp_path / "store")},
    }


def test_validate_names_each_bad_input(tmp_path: Path) -> None:
    tasks = write_tasks(tmp_path / "tasks")
    ok = [{"name": "stdlib_pick"}, {"name": "stdlib_ppl"}]
    assert light_errors(parse_spec(_spec(tmp_path, ok, [str(tasks)]))) == []
    assert light_errors(parse_spec(_spec(tmp_path, ok, [str(tmp_path / "nope")]))) == [
        f"evaluation.taskDirs[0]: {tmp_path / 'nope'} is not a folder; point it at a folder of task YAMLs "
        "and their data"
    ]
    (tmp_path / "empty").mkdir()
    assert light_errors(parse_spec(_spec(tmp_path, ok, [str(tasks), str(tmp_path / "empty")]))) == [
        f"evaluation.taskDirs[1]: no task YAML (*.yaml) in {tmp_path / 'empty'}; add the lm-eval task "
        "YAMLs there"
    ]
    (tasks / "data" / "text.jsonl").unlink()
    assert light_errors(parse_spec(_spec(tmp_path, ok, [str(tasks)]))) == [
        f"evaluation.taskDirs[0]: task 'stdlib_ppl' ({tasks / 'ppl.yaml'}) reads data file "
        f"{(tasks / 'data' / 'text.jsonl').resolve()}, which does not exist (relative paths are relative to "
        "the YAML's folder)"
    ]


@pytest.mark.slow  # lm-eval's whole index (~14k YAMLs) confirms a name unknown: 7-15 s here
def test_validate_cli_unknown_task_suggests_the_name(tmp_path: Path, capsys) -> None:
    from jobs.cli import main

    write_tasks(tmp_path / "tasks")
    spec = _spec(
        tmp_path, [{"name": "stdlib_pick"}, {"name": "hellaswg"}, {"name": "stdlib_pik"}], ["./tasks"]
    )
    doc = {
        "apiVersion": "fusionrun.dev/v1alpha1",
        "kind": "FusionRun",
        "metadata": {"name": "b"},
        "spec": spec,
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(doc))
    assert main(["validate", str(tmp_path / "run.yaml")]) == 1
    err = capsys.readouterr().err
    assert "evaluation.tasks[1].name: unknown task 'hellaswg' (did you mean hellaswag?)" in err
    assert "evaluation.tasks[2].name: unknown task 'stdlib_pik' (did you mean stdlib_pick?)" in err
    assert "tasks[0]" not in err


# --------------------------------------------------------------------------------------------------
# The evaluate stage: real lm-eval on tiny random-init models


def _fake_training(store, spec, tok_len: int, tmp: Path) -> None:
    """train/<variant>/model/ and a train manifest, as the train stage leaves them, with random-init models
    standing for trained ones (seeds 11: FuseLLM, 12: CLM-only): training itself is tested elsewhere."""
    import time

    from fusion.format import sha256_file
    from fusion.models import random_init_model, save_hf
    from jobs.complete import Output, build_manifest, write_manifest
    from jobs.plan import Stage, build_dag

    for t in build_dag(spec):
        if t.stage is not Stage.train:
            continue
        model = random_init_model("llama", tok_len, hidden_size=32, num_layers=1, num_heads=2, seed=11)
        if t.variant == "clm":
            model = random_init_model("llama", tok_len, hidden_size=32, num_layers=1, num_heads=2, seed=12)
        folder = save_hf(model, None, tmp / (t.variant or "fused"))
        outputs = {}
        for f in sorted(folder.iterdir()):
            key = f"train/{t.variant or 'fused'}/model/{f.name}"
            store.upload(f, key)
            outputs[key] = Output(sha256_file(f), f.stat().st_size)
        write_manifest(store, t, build_manifest(spec, t, outputs=outputs, inputs={}, started_at=time.time()))


def _events(err: str) -> list[tuple[str, str, bool]]:
    rows = [json.loads(line) for line in err.splitlines() if line.startswith('{"event": "benchmark"')]
    return [(r["model"], r["benchmark"], r["reused"]) for r in rows]


def _lm_eval_directly(model, tok, tasks: Path, name: str, monkeypatch) -> dict:
    """lm-eval as a user calls it, in the task folder (where its relative data paths point)."""
    import copy

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tok), max_length=128, batch_size=8)
    with monkeypatch.context() as m:
        m.chdir(tasks)
        tm = TaskManager(include_path=str(tasks), include_defaults=False)
        return simple_evaluate(model=lm, tasks=[name], num_fewshot=0, task_manager=tm)["results"][name]


def _run_with_tasks(tmp_path: Path, source_tok: str = MISTRAL_URI):
    from fusion.hub import load_tokenizer
    from jobs.plan import Stage, Task
    from jobs.stages import prepare
    from jobs.stages.common import run_task
    from jobs.store import open_store

    tasks = write_tasks(tmp_path / "tasks")
    spec = parse_spec(
        _spec(tmp_path, [{"name": "stdlib_pick"}, {"name": "stdlib_ppl"}], [str(tasks)], source_tok)
    )
    store = open_store(spec.store, "b", Settings())
    run_task(prepare.run, Task(Stage.prepare), spec, "b")
    _fake_training(store, spec, len(load_tokenizer(MISTRAL_URI)), tmp_path / "models")
    return tasks, spec, store


TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2}
LABELS = ("target-before", "fused", "clm", "source:src")


def _random_model(arch: str, tok, seed: int = 0):
    from fusion.models import load_model

    ri = {"architecture": arch, **TINY, "seed": seed}
    return load_model(
        None,
        random_init=ri,
        vocab_size=len(tok),
        device="cpu",
        dtype="float32",
        eos_token_id=tok.eos_token_id,
    )


def _check_against_lm_eval(block: dict, models: dict, tasks: Path, monkeypatch) -> None:
    for label, (model, tok) in models.items():
        for name in block:
            direct = _lm_eval_directly(model, tok, tasks, name, monkeypatch)
            for metric, fig in block[name]["models"][label].items():
                assert fig["value"] == pytest.approx(direct[f"{metric},none"], rel=1e-6), (
                    label,
                    name,
                    metric,
                )
                want = direct[f"{metric}_stderr,none"]
                assert fig["stderr"] == (want if isinstance(want, str) else pytest.approx(want, rel=1e-6))


def test_evaluate_stage_scores_tasks_as_lm_eval_does_keeps_and_reuses_scores(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    from fusion.hub import load_tokenizer
    from jobs.plan import Stage, Task
    from jobs.registry import Layout
    from jobs.stages import evaluate
    from jobs.stages.common import StageError, run_task

    tasks, spec, store = _run_with_tasks(tmp_path)
    ev = Task(Stage.evaluate)
    # The CLM-only model does not load: evaluate fails, the scores of the models before it stay.
    good_config = store.get_bytes("train/clm/model/config.json")
    store.put_bytes("train/clm/model/config.json", b"{")
    capsys.readouterr()
    with pytest.raises(StageError, match="trained model clm"):
        run_task(evaluate.run, ev, spec, "b")
    first = _events(capsys.readouterr().err)
    assert first == [(m, t, False) for m in ("target-before", "fused") for t in ("stdlib_pick", "stdlib_ppl")]
    kept = {m: store.get_bytes(Layout.task_scores(m)) for m in ("target-before", "fused")}
    assert not store.exists(Layout.task_scores("clm"))

    # A data file gone: evaluate fails at its start, naming the field; nothing scored, nothing lost.
    (tasks / "data" / "text.jsonl").rename(tmp_path / "text.jsonl")
    with pytest.raises(StageError, match=r"evaluation.taskDirs\[0\]: task 'stdlib_ppl' .* does not exist"):
        run_task(evaluate.run, ev, spec, "b")
    assert _events(capsys.readouterr().err) == []
    assert {m: store.get_bytes(Layout.task_scores(m)) for m in kept} == kept
    (tmp_path / "text.jsonl").rename(tasks / "data" / "text.jsonl")

    # Fixed: only what is missing is scored.
    store.put_bytes("train/clm/model/config.json", good_config)
    run_task(evaluate.run, ev, spec, "b")
    assert _events(capsys.readouterr().err) == [
        (m, t, m in ("target-before", "fused")) for m in LABELS for t in ("stdlib_pick", "stdlib_ppl")
    ]
    metrics = json.loads(store.get_bytes("evaluate/metrics.json"))
    block = metrics["tasks"]
    assert set(block) == {"stdlib_pick", "stdlib_ppl"}
    assert set(block["stdlib_pick"]["models"]) == set(LABELS)
    assert block["stdlib_pick"]["samples"] == 8 and block["stdlib_ppl"]["samples"] == 3
    assert block["stdlib_pick"]["higher_is_better"] == {"acc": True, "acc_norm": True}
    assert set(block["stdlib_pick"]["models"]["fused"]) == {"acc", "acc_norm"}
    assert set(block["stdlib_ppl"]["models"]["fused"]) == {
        "word_perplexity",
        "byte_perplexity",
        "bits_per_byte",
    }

    # The figures are lm-eval's own, called directly on the same model (the slow test checks more models).
    tok = load_tokenizer(MISTRAL_URI)
    _check_against_lm_eval(block, {"target-before": (_random_model("llama", tok), tok)}, tasks, monkeypatch)
    # FuseLLM minus CLM-only, per metric, with a paired interval around it.
    for b in block.values():
        assert set(b["fused_minus_clm"]) == set(b["models"]["fused"])
        for metric, d in b["fused_minus_clm"].items():
            fused, clm = b["models"]["fused"][metric]["value"], b["models"]["clm"][metric]["value"]
            assert d["delta"] == pytest.approx(fused - clm, abs=1e-6)
            assert d["ci95_low"] - 1e-9 <= d["delta"] <= d["ci95_high"] + 1e-9
    summary = metrics["task_summary"]
    assert summary["stdlib_pick"]["metric"] == "acc" and summary["stdlib_ppl"]["metric"] == "word_perplexity"
    assert set(summary["stdlib_pick"]) == {"metric", *LABELS, "fused_minus_clm"}
    assert summary["stdlib_pick"]["fused"] == round(
        block["stdlib_pick"]["models"]["fused"]["acc"]["value"], 5
    )
    assert len(json.dumps(summary)) < 1000  # small enough for FusionRun.status


@pytest.mark.slow
def test_evaluate_stage_other_tokenizer_and_changed_settings(tmp_path: Path, capsys, monkeypatch) -> None:
    """A source with its own tokenizer (Qwen's) scored on its own tokens; the trained model as loaded from
    the store; another limit for one task rescores that task alone."""
    from fusion.hub import load_tokenizer
    from fusion.models import load_model
    from jobs.plan import Stage, Task
    from jobs.stages import evaluate
    from jobs.stages.common import run_task

    tasks, spec, store = _run_with_tasks(tmp_path, QWEN_URI)
    ev = Task(Stage.evaluate)
    run_task(evaluate.run, ev, spec, "b")
    block = json.loads(store.get_bytes("evaluate/metrics.json"))["tasks"]
    tok, qtok = load_tokenizer(MISTRAL_URI), load_tokenizer(QWEN_URI)
    fused = load_model(str(store.local_path("train/fused/model/config.json").parent), device="cpu")
    models = {"fused": (fused, tok), "source:src": (_random_model("qwen2", qtok, 3), qtok)}
    _check_against_lm_eval(block, models, tasks, monkeypatch)
    capsys.readouterr()
    d = _spec(tmp_path, [{"name": "stdlib_pick", "limit": 4}, {"name": "stdlib_ppl"}], [str(tasks)], QWEN_URI)
    run_task(evaluate.run, ev, parse_spec(d), "b")
    assert _events(capsys.readouterr().err) == [
        (m, t, t == "stdlib_ppl") for m in LABELS for t in ("stdlib_pick", "stdlib_ppl")
    ]
    assert json.loads(store.get_bytes("evaluate/metrics.json"))["tasks"]["stdlib_pick"]["samples"] == 4


def _metrics_with_tasks() -> dict:
    pick = {
        "num_fewshot": 0,
        "limit": None,
        "samples": 8,
        "metric_names": ["acc", "acc_norm"],
        "higher_is_better": {"acc": True, "acc_norm": True},
        "models": {
            "fused": {"acc": {"value": 0.5, "stderr": 0.1}, "acc_norm": {"value": 0.25, "stderr": 0.05}},
            "target-before": {
                "acc": {"value": 0.25, "stderr": 0.1},
                "acc_norm": {"value": 0.25, "stderr": 0.05},
            },
            "clm": {"acc": {"value": 0.375, "stderr": 0.1}, "acc_norm": {"value": 0.25, "stderr": 0.05}},
        },
        "fused_minus_clm": {
            "acc": {"delta": 0.125, "ci95_low": -0.125, "ci95_high": 0.375},
            "acc_norm": {"delta": 0.0},
        },
        "fused_minus_self": {"acc": {"delta": 0.25, "ci95_low": 0.0, "ci95_high": 0.5}},
    }
    return {
        "models": {"fused": {"bits_per_byte": 1.2}, "clm": {"bits_per_byte": 1.3}},
        "fused_minus_clm": {"bits_per_byte": -0.1, "ci95_low": -0.15, "ci95_high": -0.05},
        "tasks": {"pick": pick},
        "task_summary": {"pick": {"metric": "acc", "target-before": 0.25, "fused": 0.5, "clm": 0.375}},
    }


def test_report_leads_with_what_the_run_can_show(tmp_path: Path) -> None:
    from jobs.report import _plot_tasks, render_markdown

    data = {"metrics": _metrics_with_tasks(), "tasks": {}, "tiny_random_init": True}
    tiny = render_markdown("t", data, {}).splitlines()
    assert tiny[2].startswith("> **Tiny random-init models.**") and "docs/results.md" in tiny[2]
    assert "not whether fusion helps" in tiny[2]
    real = render_markdown("r", {**data, "tiny_random_init": False}, {"tasks": "tasks.png"}).splitlines()
    assert real[2] == (
        "**FuseLLM vs CLM-only (same data, steps, seed and schedule):** held-out bits per byte -0.1000 "
        "(95% paired bootstrap interval -0.1500 to -0.0500; negative favours FuseLLM)."
    )
    assert real[3] == (
        "- pick, acc (higher is better): FuseLLM minus CLM-only +0.1250 (95% paired bootstrap interval "
        "-0.1250 to +0.3750)."
    )
    assert real[4] == (
        "- pick, acc (higher is better): FuseLLM minus self-distillation +0.2500 (95% paired bootstrap "
        "interval +0.0000 to +0.5000)."
    )
    text = "\n".join(real)
    assert "| model | acc | acc_norm |" in text
    # reading order: target before, CLM only, FuseLLM; each figure with lm-eval's stderr
    table = real[real.index("## Benchmark: pick (lm-evaluation-harness)") :]
    rows = [r for r in table if r.startswith("| target (before) |") or r.startswith("| CLM only |")]
    assert rows == [
        "| target (before) | 0.2500 ± 0.1000 | 0.2500 ± 0.0500 |",
        "| CLM only | 0.3750 ± 0.1000 | 0.2500 ± 0.0500 |",
    ]
    assert (
        "- FuseLLM minus CLM-only, acc_norm: +0.0000 (no interval: per-document values not available)."
        in text
    )
    assert "- FuseLLM minus self-distillation, acc: +0.2500 (95% paired bootstrap interval" in text
    assert "![benchmark tasks](tasks.png)" in text
    assert (
        _plot_tasks(data["metrics"], tmp_path / "tasks.png")
        and (tmp_path / "tasks.png").stat().st_size > 1000
    )
    no_clm = {
        "metrics": {"models": {"fused": {"bits_per_byte": 1.0}}},
        "tasks": {},
        "tiny_random_init": False,
    }
    assert render_markdown("n", no_clm, {}).splitlines()[2].startswith("No CLM-only baseline in this run")


@pytest.mark.slow
def test_local_run_with_tasks_report_and_status(tmp_path: Path) -> None:
    """The whole tiny pipeline with evaluation.tasks (subprocesses, DeepSpeed training): the report leads
    with what random-init models can show and has a table per task; the status gets the summary; a rerun
    skips everything."""
    from jobs.local import LocalRunner
    from jobs.plan import build_dag
    from jobs.status import FusionRunStatus
    from jobs.store import open_store
    from tests.test_local_pipeline import tiny_spec

    tasks = write_tasks(tmp_path / "tasks")
    d = tiny_spec(tmp_path)
    d["evaluation"] = {"tasks": [{"name": "stdlib_pick"}, {"name": "stdlib_ppl"}], "taskDirs": [str(tasks)]}
    spec = parse_spec(d)
    result = LocalRunner(spec, "bt", extra_env={"OMP_NUM_THREADS": "1"}).run()
    assert result.ran == len(build_dag(spec))
    metrics = json.loads(open_store(spec.store, "bt", Settings()).get_bytes("evaluate/metrics.json"))
    assert set(metrics["tasks"]["stdlib_pick"]["models"]) == {"target-before", "fused", "source:mis"}
    lines = result.report.read_text().splitlines()
    assert lines[2].startswith("> **Tiny random-init models.**") and "docs/results.md" in lines[2]
    assert "## Benchmark: stdlib_pick (lm-evaluation-harness)" in lines
    assert (result.report.parent / "tasks.png").stat().st_size > 1000
    status = FusionRunStatus(metrics=metrics).to_k8s()["metrics"]
    assert status["task_summary"]["stdlib_pick"]["metric"] == "acc"
    assert LocalRunner(spec, "bt").run().ran == 0
