"""The ablation driver (bench/ablation.py): every variant is a valid FusionRun that reuses the base run's
extraction and alignment (same fingerprints), and changes exactly what it says."""

from __future__ import annotations

import pytest

from bench import ablation
from jobs.cache import Identities, task_key
from jobs.plan import Stage, build_dag
from jobs.spec import load_fusionrun, parse_fusionrun


@pytest.fixture(scope="module")
def base():
    run = load_fusionrun(ablation.BASE_SPEC)
    doc = {
        "apiVersion": run.api_version,
        "metadata": {"name": run.metadata.name},
        "spec": run.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
    }
    return run, doc


class SpecIdentities(Identities):
    """Identities from the spec alone (the real models need not be here): what the keys are made of."""

    def __init__(self) -> None:
        super().__init__(None, None, live=False)

    def _get(self, kind, ref, compute):
        return f"{kind}:{sorted(ref.items())}"


@pytest.mark.parametrize("variant", list(ablation.VARIANTS))
def test_variant_is_valid_and_reuses_extraction_and_alignment(base, variant: str) -> None:
    """Same content keys (jobs.cache) for prepare, extract and align: the variant adopts the base run's
    shared entries, whatever it changes downstream."""
    run, doc = base
    v = parse_fusionrun(ablation.variant_document(doc, variant))
    assert v.metadata.name == f"real-smollm2-gemma-{variant}"
    assert not v.spec.evaluation.evaluate_sources  # scored once, by the base run
    by_id = {t.id: t for t in build_dag(run.spec)}
    ids = SpecIdentities()
    for t in build_dag(v.spec):
        if t.stage in (Stage.prepare, Stage.extract, Stage.align):
            inputs = {"inputs of": t.id}  # the same upstream outputs, since their keys are the same
            assert task_key(v.spec, t, ids, inputs) == task_key(run.spec, by_id[t.id], ids, inputs), t.id


def test_overrides_change_only_their_fields(base) -> None:
    _, doc = base
    lam = parse_fusionrun(ablation.variant_document(doc, "lambda-0p5")).spec
    assert lam.training.lambda_ == 0.5 and not lam.training.clm_baseline
    assert lam.fusion.strategy == "minCE" and lam.training.max_steps == 20
    seed = parse_fusionrun(ablation.variant_document(doc, "seed-1")).spec
    assert seed.training.seed == 1 and seed.training.clm_baseline and seed.training.lambda_ == 0.9
    k3 = parse_fusionrun(ablation.variant_document(doc, "topk-3")).spec
    assert k3.fusion.top_k == 3 and k3.extraction.top_k == 10


def test_table_compares_each_variant_with_its_own_or_the_base_baseline(tmp_path) -> None:
    import json

    def metrics(run: str, models: dict, code: dict) -> None:
        (tmp_path / run / "evaluate").mkdir(parents=True)
        doc = {"models": models, "corpora": {"code": {"models": code}}}
        (tmp_path / run / "evaluate" / "metrics.json").write_text(json.dumps(doc))

    def m(bits: list[float]) -> dict:  # two documents of 10 bytes each
        return {"bits_per_byte": sum(bits) / 20, "doc_bits": bits, "doc_bytes": [10, 10]}

    metrics("b", {"fused": m([10, 10]), "clm": m([9, 9])}, {"fused": m([8, 8]), "clm": m([9, 9])})
    metrics("b-v", {"fused": m([8, 10])}, {"fused": m([9, 9])})  # no CLM of its own: the base's is used
    rows = ablation.table(tmp_path, "b", ["v", "missing"])
    assert [r["variant"] for r in rows] == ["base: lambda 0.9, MinCE, sequence, per-byte, k 10", "v"]
    assert rows[0]["heldout"]["difference"] == (0.1, 0.1, 0.1)  # 20 - 18 bits over 20 bytes, every resample
    assert rows[0]["code"]["difference"] == (-0.1, -0.1, -0.1)  # 16 - 18 bits
    v = rows[1]
    assert not v["clm_is_own"] and v["heldout"]["clm"] == 0.9 and v["heldout"]["fused"] == 0.9
    assert v["heldout"]["difference"][0] == 0.0 and v["code"]["difference"] == (0.0, 0.0, 0.0)


def test_a_variant_without_its_own_baseline_can_borrow_a_sibling_s(tmp_path) -> None:
    import json

    def write(run: str, models: dict) -> None:
        (tmp_path / run / "evaluate").mkdir(parents=True)
        (tmp_path / run / "evaluate" / "metrics.json").write_text(json.dumps({"models": models}))

    def m(bpb: float) -> dict:
        return {"bits_per_byte": bpb, "doc_bits": [10 * bpb], "doc_bytes": [10]}

    write("b", {"fused": m(0.95), "clm": m(0.94)})
    write("b-long", {"fused": m(0.87), "clm": m(0.88)})
    write("b-long-lambda-0p5", {"fused": m(0.86)})
    rows = {r["variant"]: r for r in ablation.table(tmp_path, "b", ["long", "long-lambda-0p5"])}
    assert ablation.CLM_FROM["long-lambda-0p5"] == "long"
    assert rows["long-lambda-0p5"]["heldout"]["clm"] == 0.88  # the long schedule's CLM, not the base's 0.94
    assert rows["long-lambda-0p5"]["heldout"]["difference"][0] == pytest.approx(-0.02)
