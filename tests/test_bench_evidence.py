"""The evidence driver (bench/evidence.py): every run is a valid FusionRun that reuses the headline run's
extraction (the same content keys in the shared cache), changes what it says, and the tables compare what
they claim on the same documents."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench import evidence
from bench.ablation import _json, absolute_document
from jobs.cache import Identities, task_key
from jobs.plan import Stage, build_dag, trained_variants
from jobs.spec import parse_fusionrun


class SpecIdentities(Identities):
    """Identities from the spec alone (the real models need not be here)."""

    def __init__(self) -> None:
        super().__init__(None, None, live=False)

    def _get(self, kind, ref, compute):
        return f"{kind}:{sorted(ref.items())}"


STORE = Path("/store")
SINGLE_SOURCE = [r for r in evidence.RUNS if r not in evidence.TWO_SOURCE_RUNS]


@pytest.fixture(scope="module")
def base():
    doc = absolute_document(evidence.BASE_SPEC)
    return parse_fusionrun(doc).spec, doc


def test_the_headline_trains_every_baseline_on_the_same_blocks(base) -> None:
    spec, _ = base
    assert trained_variants(spec) == ["fused", "clm", "self", "sources"]
    assert (spec.alignment.method, spec.alignment.projection) == ("exact", "continuation")
    assert (spec.fusion.ce_on, spec.fusion.fallback) == ("target", "target")
    assert spec.evaluation.evaluate_sources and spec.evaluation.tasks  # scored in the headline run only


@pytest.mark.parametrize("run", SINGLE_SOURCE)
def test_each_run_reuses_the_extraction_and_changes_only_its_fields(base, run: str) -> None:
    spec, doc = base
    v = parse_fusionrun(evidence.run_document(doc, run, STORE))
    assert v.metadata.name == f"evidence-pkg-code-{run}"
    assert not v.spec.evaluation.evaluate_sources  # scored once, in the headline run
    assert bool(v.spec.evaluation.tasks) is (run == "large-tasks")  # the 60-item tasks: in the headline
    ids, by_id = SpecIdentities(), {t.id: t for t in build_dag(spec)}
    extracts_anew = "extraction" in evidence.RUNS[run][1]  # top-k-128: its own k = 128 extraction
    for t in build_dag(v.spec):
        if t.stage in (Stage.prepare, Stage.extract):
            inputs = {"inputs of": t.id}
            same = task_key(v.spec, t, ids, inputs) == task_key(spec, by_id[t.id], ids, inputs)
            assert same is not (extracts_anew and t.stage is Stage.extract), t.id
    mined = evidence.run_document(doc, "mined", STORE)["spec"]
    assert mined["alignment"]["method"] == "mined" and mined["fusion"]["ceOn"] == "target"
    top_k = parse_fusionrun(evidence.run_document(doc, "top-k-128", STORE)).spec
    assert (top_k.extraction.top_k, trained_variants(top_k)) == (128, ["fused", "self"])
    paper = parse_fusionrun(evidence.run_document(doc, "paper-fusion", STORE)).spec
    assert (paper.fusion.ce_on, paper.fusion.fallback, trained_variants(paper)) == (
        "own",
        "onehot",
        ["fused"],
    )
    token = parse_fusionrun(evidence.run_document(doc, "token-level", STORE)).spec
    assert (token.fusion.level, token.fusion.ce_on, trained_variants(token)) == ("token", "target", ["fused"])
    lam = parse_fusionrun(evidence.run_document(doc, "lambda-0p9", STORE)).spec
    assert lam.training.lambda_ == 0.9 and trained_variants(lam) == ["fused", "self"]  # CLM-only: lambda 1
    seed = parse_fusionrun(evidence.run_document(doc, "seed-1", STORE)).spec
    assert seed.training.seed == 1 and trained_variants(seed) == ["fused", "clm", "self"]
    for run in ("one-epoch", "one-epoch-seed-1"):  # the headline comparisons again, on one pass
        short = parse_fusionrun(evidence.run_document(doc, run, STORE)).spec
        assert short.training.max_steps == 17 and trained_variants(short) == ["fused", "clm", "self"]


def test_large_tasks_scores_the_headlines_models_on_thousands_of_items(base) -> None:
    from jobs.registry import fingerprint_fields

    spec, doc = base
    v = parse_fusionrun(evidence.run_document(doc, "large-tasks", STORE)).spec
    assert trained_variants(v) == ["fused", "clm", "self"]
    trained = {t.id: t for t in build_dag(spec) if t.stage is Stage.train}
    for t in (t for t in build_dag(v) if t.stage is Stage.train):  # the same training as the headline's
        want = fingerprint_fields(spec.model_dump(mode="json", by_alias=True), trained[t.id])
        assert fingerprint_fields(v.model_dump(mode="json", by_alias=True), t) == want, t.id
    # every item, on the models compared (3,000 items take ~20-35 min a model on this machine)
    assert [(t.name, t.limit, t.models) for t in v.evaluation.tasks] == [
        ("pkg_docname", None, ["fused", "clm", "self"]),
        ("pkg_nextsentence", None, ["fused", "clm", "self"]),
    ]
    assert v.evaluation.task_dirs == [str(evidence.ROOT / "examples" / "tasks-pkg")]


def test_task_table_pairs_items_and_counts_disagreements(tmp_path) -> None:
    def scores(label: str, acc: list[int]) -> None:
        doc = {"model": label, "tasks": {"t": {"per_doc": {"t": {"doc_ids": [0, 1, 2, 3], "acc": acc}}}}}
        path = tmp_path / "evaluate" / "tasks" / f"{label}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc))

    scores("fused", [1, 1, 0, 1])
    scores("clm", [1, 0, 0, 1])
    figures = {
        "fused": {"acc": {"value": 0.75, "stderr": 0.25}},
        "clm": {"acc": {"value": 0.5, "stderr": 0.25}},
    }
    block = {
        "requested_as": "t",
        "samples": 4,
        "metric_names": ["acc"],
        "models": {**figures, "self": {"acc": {"value": 0.5, "stderr": "N/A"}}},
        "fused_minus_clm": {"acc": {"delta": 0.25, "ci95_low": 0.0, "ci95_high": 0.75}},
        "fused_minus_self": {"acc": {"delta": 0.25}},  # no per-item values kept for self
    }
    lines = evidence.task_table({"tasks": {"t": block}}, tmp_path)
    assert lines[:7] == [
        "### task t, 4 items",
        "",
        "| model | acc |",
        "|---|---|",
        "| CLM-only | 0.5000 ± 0.2500 |",
        "| self-distillation | 0.5000 |",
        "| FuseLLM | 0.7500 ± 0.2500 |",
    ]
    assert "| FuseLLM minus CLM-only | acc | +0.2500 [+0.0000, +0.7500] | 25.0% |" in lines  # 1 item of 4
    assert "| FuseLLM minus self-distillation | acc | +0.2500 (no interval) | - |" in lines
    assert evidence.task_table({"models": {}}, tmp_path) == []


def test_tables_pair_the_same_documents_within_and_across_runs(tmp_path) -> None:
    def m(bits: list[float]) -> dict:  # two documents of 10 bytes each
        return {"bits_per_byte": sum(bits) / 20, "perplexity": 2.0, "doc_bits": bits, "doc_bytes": [10, 10]}

    head = {"models": {"fused": m([8, 8]), "clm": m([9, 9]), "self": m([10, 10])}}
    (tmp_path / "b" / "evaluate").mkdir(parents=True)
    (tmp_path / "b" / "evaluate" / "metrics.json").write_text(json.dumps(head))
    (tmp_path / "b-mined" / "evaluate").mkdir(parents=True)
    (tmp_path / "b-mined" / "evaluate" / "metrics.json").write_text(
        json.dumps({"models": {"fused": m([9, 9])}})
    )
    md = evidence.tables(tmp_path, "b")
    assert "| FuseLLM minus CLM-only | -0.1000 [-0.1000, -0.1000] | +0.0% |" in md  # 16 - 18 bits / 20 bytes
    assert "| FuseLLM minus self-distillation | -0.2000 [-0.2000, -0.2000] | +0.0% |" in md
    assert "| exact alignment minus MinED (same fusion settings) | -0.1000 [-0.1000, -0.1000] |" in md
    # A fusion-only run against the headline's baselines: 18 - 20 and 18 - 18 bits over 20 bytes.
    assert "| mined FuseLLM minus the headline's self-distillation | -0.1000 [-0.1000, -0.1000] |" in md
    assert "| mined FuseLLM minus the headline's CLM-only | +0.0000 [+0.0000, +0.0000] |" in md
    assert "token-level" not in md  # not run: no row
    # The plot: one panel per baseline the headline trained; nothing to plot without the headline.
    assert evidence.plot(tmp_path, "b", tmp_path / "d.png") and (tmp_path / "d.png").stat().st_size > 0
    assert not evidence.plot(tmp_path, "missing", tmp_path / "e.png") and not (tmp_path / "e.png").exists()


def test_the_two_source_runs_fuse_the_experts_on_the_same_blocks(base) -> None:
    spec, doc = base
    runs = {r: parse_fusionrun(evidence.run_document(doc, r, STORE)).spec for r in evidence.TWO_SOURCE_RUNS}
    code = "/store/evidence-pkg-code/train/clm/model/"  # the headline's CLM-only model
    prose = "/store/evidence-pkg-code-expert-prose/train/fused/model/"  # lambda 1: CLM-only as well
    expert = runs["expert-prose"]
    assert expert.training.lambda_ == 1.0 and trained_variants(expert) == ["fused"]
    assert expert.corpus.uri.endswith("/dev-reference.jsonl")
    assert [(m.name, m.uri) for m in expert.sources] == [("code", code)]
    assert [(m.name, m.uri) for m in runs["two-experts"].sources] == [("code", code), ("prose", prose)]
    assert [m.uri for m in runs["code-expert"].sources] == [code]
    assert [m.uri for m in runs["prose-expert"].sources] == [prose]
    assert trained_variants(runs["two-experts"]) == ["fused", "clm"]
    assert runs["two-experts"].evaluation.evaluate_sources  # each expert scored on the held-out texts
    # The three fusions: the same corpus, blocks and training; each expert extracted once for all of them
    # (prepare's key names its models, but its documents are the same bytes when the experts share the
    # target's tokenizer: extraction is keyed by those bytes, the `inputs` here).
    ids = SpecIdentities()
    keys = {
        r: {
            t.id: task_key(runs[r], t, ids, {"inputs": "the same documents"})
            for t in build_dag(runs[r])
            if t.stage is Stage.extract
        }
        for r in ("two-experts", "code-expert", "prose-expert")
    }
    for r in ("code-expert", "prose-expert"):
        assert keys[r].items() <= keys["two-experts"].items(), r
        assert runs[r].training == runs["two-experts"].training.model_copy(update={"clm_baseline": False})
    prepare = [task_key(s, build_dag(s)[0], ids, {}) for s in (spec, runs["two-experts"])]
    assert prepare[0] != prepare[1]  # not the headline's text
    assert [c.name for c in runs["two-experts"].evaluation.corpora] == [
        "code-unseen",
        "prose-unseen",
        "stdlib-code",
        "debian-faq",
        "debian-reference",
    ]


def test_the_two_source_tables_compare_both_experts_with_each_alone_and_count_the_picks(tmp_path) -> None:
    from fusion.format import write_shard
    from jobs.corpus import pack_texts
    from jobs.registry import CacheLayout, Layout, Stage, Task

    def m(bits: list[float]) -> dict:  # two documents of 10 bytes each
        return {"bits_per_byte": sum(bits) / 20, "perplexity": 2.0, "doc_bits": bits, "doc_bytes": [10, 10]}

    def metrics(run: str, models: dict) -> None:
        (tmp_path / run / "evaluate").mkdir(parents=True)
        doc = {"models": models, "corpora": {"debian-faq": {"models": models}}}
        (tmp_path / run / "evaluate" / "metrics.json").write_text(json.dumps(doc))

    metrics("b-two-experts", {"fused": m([8, 8]), "clm": m([10, 10])})
    metrics("b-code-expert", {"fused": m([9, 9])})
    # The training text: two code records, one prose record; MinCE picked code, the target, prose.
    corpus = tmp_path / "code-prose.jsonl"
    records = [("def f(): pass", "code"), ("x = 1", "code"), ("Debian is free.", "prose")]
    corpus.write_text("".join(json.dumps({"text": t, "domain": d}) + "\n" for t, d in records))
    entry = "prepare/ab/abc"
    run = tmp_path / "b-two-experts"
    (run / "prepare").mkdir()
    (run / Layout.manifest(Task(stage=Stage.prepare))).write_text(
        json.dumps({"stage": "prepare", "entry": entry, "summary": {"shards": 1}, "outputs": {}})
    )
    text, offsets = pack_texts(["Debian is free.", "def f(): pass", "x = 1"])
    docs_path = tmp_path / CacheLayout.AREA / entry / CacheLayout.file(Stage.prepare, Layout.documents(0))
    docs_path.parent.mkdir(parents=True)
    write_shard(docs_path, "raw", {"text": text, "doc_offsets": offsets, "doc_index": np.array([5, 0, 1])})
    fused = {
        "doc_index": np.array([0, 1, 5]),
        "doc_offsets": np.array([0, 2, 4, 6]),
        "input_ids": np.arange(6, dtype=np.uint16),
        "target_ids": np.zeros((6, 1), np.int32),
        "target_probs": np.ones((6, 1), np.float16),
        "choice": np.array([1, 0, 2], np.int8),
    }
    fuse_path = run / Layout.shard(Task(stage=Stage.fuse, shard=0))
    fuse_path.parent.mkdir(parents=True)
    write_shard(fuse_path, "fused", fused, meta={"candidates": ["smollm2", "code", "prose"]})
    assert evidence.domain_picks(run, corpus) == {"code": {"code": 1, "smollm2": 1}, "prose": {"prose": 1}}
    # The code expert's extraction: 2 ln 2 nats over 4 bytes and 6 ln 2 over 3 bytes on code, 3 ln 2 over
    # 6 bytes on prose: 8 bits / 7 bytes on code, 0.5 on prose.
    ln2 = float(np.log(2))
    extract = {
        "doc_index": np.array([0, 1, 5]),
        "doc_offsets": np.array([0, 2, 4, 6]),
        "input_ids": np.arange(6, dtype=np.uint16),
        "token_nbytes": np.ones(6, np.uint16),
        "topk_ids": np.zeros((6, 1), np.uint16),
        "topk_logprobs": np.zeros((6, 1), np.float16),
        "gold_logprob": np.zeros(6, np.float16),
        "doc_nll": np.array([2 * ln2, 6 * ln2, 3 * ln2], np.float32),
        "doc_pred_nbytes": np.array([4, 3, 6]),
        "doc_n_pred": np.array([1, 1, 1], np.int32),
    }
    ex_task = Task(stage=Stage.extract, model="code", shard=0)
    (run / Layout.shard(ex_task)).parent.mkdir(parents=True)
    write_shard(run / Layout.shard(ex_task), "extract", extract)
    (run / Layout.manifest(ex_task)).write_text(
        '{"stage": "extract", "outputs": {}}'
    )  # not from the shared cache: the run's own shard
    got = evidence.domain_bits_per_byte(run, corpus, ["smollm2", "code"])
    assert got == {"code": {"code": pytest.approx(8 / 7)}, "prose": {"code": pytest.approx(0.5)}}
    runs = {r: _json(tmp_path / f"b-{r}" / Layout.METRICS) for r in ("two-experts", "code-expert")}
    md = "\n".join(evidence.two_source_tables(tmp_path, "b", runs))
    one = "-0.1000 [-0.1000, -0.1000]"
    assert f"| both experts minus the code expert alone | {one} |" in md  # debian-faq (not the split)
    assert "| both experts minus CLM-only | -0.2000 [-0.2000, -0.2000] |" in md
    assert "prose expert alone" not in md  # not run: no row
