"""The evidence driver (bench/evidence.py): every run is a valid FusionRun that reuses the headline run's
extraction (the same content keys in the shared cache), changes what it says, and the tables compare what
they claim on the same documents."""

from __future__ import annotations

import json

import pytest

from bench import evidence
from bench.ablation import absolute_document
from jobs.cache import Identities, task_key
from jobs.plan import Stage, build_dag, trained_variants
from jobs.spec import parse_fusionrun


class SpecIdentities(Identities):
    """Identities from the spec alone (the real models need not be here)."""

    def __init__(self) -> None:
        super().__init__(None, None, live=False)

    def _get(self, kind, ref, compute):
        return f"{kind}:{sorted(ref.items())}"


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


@pytest.mark.parametrize("run", list(evidence.RUNS))
def test_each_run_reuses_the_extraction_and_changes_only_its_fields(base, run: str) -> None:
    spec, doc = base
    v = parse_fusionrun(evidence.run_document(doc, run))
    assert v.metadata.name == f"evidence-pkg-code-{run}"
    assert not v.spec.evaluation.evaluate_sources and not v.spec.evaluation.tasks  # scored once
    ids, by_id = SpecIdentities(), {t.id: t for t in build_dag(spec)}
    extracts_anew = "extraction" in evidence.RUNS[run][1]  # top-k-128: its own k = 128 extraction
    for t in build_dag(v.spec):
        if t.stage in (Stage.prepare, Stage.extract):
            inputs = {"inputs of": t.id}
            same = task_key(v.spec, t, ids, inputs) == task_key(spec, by_id[t.id], ids, inputs)
            assert same is not (extracts_anew and t.stage is Stage.extract), t.id
    mined = evidence.run_document(doc, "mined")["spec"]
    assert mined["alignment"]["method"] == "mined" and mined["fusion"]["ceOn"] == "target"
    top_k = parse_fusionrun(evidence.run_document(doc, "top-k-128")).spec
    assert (top_k.extraction.top_k, trained_variants(top_k)) == (128, ["fused", "self"])
    paper = parse_fusionrun(evidence.run_document(doc, "paper-fusion")).spec
    assert (paper.fusion.ce_on, paper.fusion.fallback, trained_variants(paper)) == (
        "own",
        "onehot",
        ["fused"],
    )
    token = parse_fusionrun(evidence.run_document(doc, "token-level")).spec
    assert (token.fusion.level, token.fusion.ce_on, trained_variants(token)) == ("token", "target", ["fused"])
    lam = parse_fusionrun(evidence.run_document(doc, "lambda-0p9")).spec
    assert lam.training.lambda_ == 0.9 and trained_variants(lam) == ["fused", "self"]  # CLM-only: lambda 1
    seed = parse_fusionrun(evidence.run_document(doc, "seed-1")).spec
    assert seed.training.seed == 1 and trained_variants(seed) == ["fused", "clm", "self"]
    for run in ("one-epoch", "one-epoch-seed-1"):  # the headline comparisons again, on one pass
        short = parse_fusionrun(evidence.run_document(doc, run)).spec
        assert short.training.max_steps == 17 and trained_variants(short) == ["fused", "clm", "self"]


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
