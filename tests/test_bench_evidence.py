"""The evidence driver (bench/evidence.py): its variants are valid FusionRuns that reuse the base run's
extraction and alignment where their model list allows it, and the self variant is the target as its
own only teacher."""

from __future__ import annotations

import pytest

from bench import evidence
from jobs.manifest import fingerprint
from jobs.plan import Stage, build_dag
from jobs.spec import load_fusionrun, parse_fusionrun


@pytest.fixture(scope="module")
def base():
    run = load_fusionrun(evidence.BASE_SPEC)
    doc = {
        "apiVersion": run.api_version,
        "metadata": {"name": run.metadata.name},
        "spec": run.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
    }
    return run, doc


@pytest.mark.parametrize("variant", [v for v in evidence.VARIANTS if not evidence.is_self(v)])
def test_variant_reuses_extraction_and_alignment(base, variant: str) -> None:
    run, doc = base
    v = parse_fusionrun(evidence.variant_document(doc, variant))
    assert v.metadata.name == f"real-pkg-code-{variant}"
    assert not v.spec.evaluation.evaluate_sources
    by_id = {t.id: t for t in build_dag(run.spec)}
    for t in build_dag(v.spec):
        if t.stage in (Stage.prepare, Stage.extract, Stage.align):
            assert fingerprint(v.spec, t) == fingerprint(run.spec, by_id[t.id]), t.id


def test_self_variant_is_the_target_as_its_only_teacher(base) -> None:
    run, doc = base
    v = parse_fusionrun(evidence.variant_document(doc, "self")).spec
    (src,) = v.sources
    assert src.name == "self"
    assert (src.uri, src.gguf_file, src.add_bos) == (v.target.uri, v.target.gguf_file, v.target.add_bos)
    assert not v.fusion.include_target and not v.training.clm_baseline
    # Same training and data otherwise; the target's own extraction task keeps its fingerprint (the base
    # run's shards serve it), while prepare's changes with the model list (redone, checked identical).
    assert v.training.model_dump(exclude={"clm_baseline"}) == run.spec.training.model_dump(
        exclude={"clm_baseline"}
    )
    base_ids = {t.id: t for t in build_dag(run.spec)}
    for t in build_dag(v):
        if t.stage is Stage.extract and t.model == v.target.name:
            assert fingerprint(v, t) == fingerprint(run.spec, base_ids[t.id])
        if t.stage is Stage.prepare:
            assert fingerprint(v, t) != fingerprint(run.spec, base_ids[t.id])
