"""The stage registry (jobs.registry) is the one source of stage facts: everything else derives from it."""

from __future__ import annotations

import yaml

from jobs.cli import stage_parser
from jobs.complete import accepted_fingerprints, fingerprint
from jobs.crd import crd
from jobs.plan import build_dag, trained_variants
from jobs.registry import CONDITIONS, STAGE_NAMES, STAGES, Layout, Stage, Task, Variant
from jobs.spec import Resources, parse_spec
from jobs.status import STAGE_CONDITIONS, Stages
from tests.test_spec import GOOD

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _spec(**training):
    return parse_spec({**GOOD, "training": {**GOOD.get("training", {}), **training}})


def test_every_stage_reaches_spec_status_crd_cli_and_dag() -> None:
    names = set(STAGE_NAMES)
    assert names == {"prepare", "extract", "align", "fuse", "train", "evaluate"}
    assert set(Resources.model_fields) == names
    assert set(Stages.model_fields) == names
    assert set(STAGE_CONDITIONS) == names == set(CONDITIONS)
    doc = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    assert set(doc["spec"]["properties"]["resources"]["properties"]) == names
    assert set(doc["status"]["properties"]["stages"]["properties"]) == names
    restart = doc["spec"]["properties"]["retry"]["properties"]["restartFrom"]
    assert restart["enum"] == list(STAGE_NAMES)
    stage_choices = next(a for a in stage_parser()._actions if a.dest == "stage").choices
    assert list(stage_choices) == list(STAGE_NAMES)
    assert {t.stage.value for t in build_dag(_spec(selfDistillBaseline=True))} == names


def test_task_ids_args_and_keys_keep_the_existing_layout() -> None:
    """Stores written before the registry must still be read: the same ids, arguments and keys."""
    cases = [
        (Task(Stage.prepare), "prepare", ["prepare"], "prepare/manifest.json"),
        (
            Task(Stage.extract, model="tgt", shard=3),
            "extract-tgt-00003",
            ["extract", "--model", "tgt", "--shard", "3"],
            "extract/tgt/shard-00003.manifest.json",
        ),
        (
            Task(Stage.align, model="src", shard=0),
            "align-src-00000",
            ["align", "--model", "src", "--shard", "0"],
            "align/src/shard-00000.manifest.json",
        ),
        (
            Task(Stage.fuse, shard=1, variant="fused"),
            "fuse-00001",
            ["fuse", "--shard", "1"],
            "fuse/shard-00001.manifest.json",
        ),
        (
            Task(Stage.fuse, shard=1, variant="self"),
            "fuse-self-00001",
            ["fuse", "--shard", "1", "--variant", "self"],
            "fuse/self/shard-00001.manifest.json",
        ),
        (
            Task(Stage.train, variant="fused"),
            "train",
            ["train", "--variant", "fused"],
            "train/fused/manifest.json",
        ),
        (
            Task(Stage.train, variant="clm"),
            "train-clm",
            ["train", "--variant", "clm"],
            "train/clm/manifest.json",
        ),
        (Task(Stage.evaluate), "evaluate", ["evaluate"], "evaluate/manifest.json"),
    ]
    for task, task_id, args, manifest in cases:
        assert (task.id, task.args(), Layout.manifest(task)) == (task_id, args, manifest)
    assert Layout.shard(Task(Stage.extract, model="m", shard=7)) == "extract/m/shard-00007.safetensors"
    assert (
        Layout.shard(Task(Stage.fuse, shard=0, variant="sources")) == "fuse/sources/shard-00000.safetensors"
    )
    assert Layout.documents(2) == "prepare/shard-00002.safetensors"
    assert (Layout.HELDOUT, Layout.METRICS) == ("prepare/heldout.safetensors", "evaluate/metrics.json")
    assert (Layout.model_prefix("clm"), Layout.progress(None)) == (
        "train/clm/model/",
        "train/fused/progress.json",
    )
    assert Layout.vocab_map("src") == "align/src/vocab-map.npz"


def test_cli_arguments_parse_back_to_the_same_task() -> None:
    spec = _spec(clmBaseline=True, selfDistillBaseline=True, sourcesOnlyBaseline=True)
    for task in build_dag(spec):
        ns = stage_parser().parse_args(task.args())
        again = Task(Stage(ns.stage), model=ns.model, shard=ns.shard, variant=ns.variant or task.variant)
        assert again.id == task.id


def test_fingerprints_are_unchanged_for_stores_written_before_the_registry() -> None:
    """Computed with the code before jobs.registry existed (commit f3f0480) on examples/tiny-local.yaml."""
    doc = yaml.safe_load((ROOT / "examples" / "tiny-local.yaml").read_text())["spec"]
    for later in ("tasks", "taskDirs"):  # the example gained benchmark tasks after that commit
        doc.get("evaluation", {}).pop(later, None)
    spec = parse_spec(doc)
    by_id = {t.id: t for t in build_dag(spec)}
    expected = {
        "prepare": "ba322a9cd14785141c0b43546810feac5368dc75174aa36b38c71f218aebc025",
        "extract-neox-mistral-00001": "e4f0dc5fda34d64fd3531a8076353e17918c95be85f9bfb16655bab6c92b0f9b",
        "align-qwen2-qwen-00000": "36c975b264c6791b0752bde7381603988f2efa226efd0053b6219d8039a8b8fe",
        "fuse-00001": "c5cadd6798610f874322c4f71fcd96de1b715d0b8ad1cbb98369a265518a4d38",
        "train": "bad065a701ddb06c3e4a2f4ac6ef4a477d9fb23bfc5d09f195d9a10466d16377",
        "train-clm": "38163e9e2918cb69ebea23d7658d5d420129bd0675d548a005ebe4ca6bb4e6ec",
        "evaluate": "88744ee71e0b06165cb3b34df49a221eded628f44bfec8dbf3776c01f15ac1e2",
    }
    assert {k: v for k, v in expected.items() if v in accepted_fingerprints(spec, by_id[k])} == expected
    # Training no longer counts training.clmBaseline (it decides which variants exist, not what one trains):
    # the training records above stay valid through legacy_fingerprint_fields, nothing else changed.
    changed = {k for k in expected if fingerprint(spec, by_id[k]) != expected[k]}
    assert changed == {"train", "train-clm"}


def test_baselines_are_variants_with_their_own_teachers() -> None:
    spec = _spec(clmBaseline=True, selfDistillBaseline=True, sourcesOnlyBaseline=True)
    assert trained_variants(spec) == ["fused", "clm", "self", "sources"]
    dag = {t.id: t for t in build_dag(spec)}
    target, source = spec.target.name, spec.sources[0].name
    # Self-distillation: the target's own extraction is the only teacher (no alignment needed).
    assert dag["fuse-self-00000"].deps == (f"extract-{target}-00000",)
    assert dag["fuse-sources-00000"].deps == (f"extract-{target}-00000", f"align-{source}-00000")
    assert dag["train-self"].deps == ("fuse-self-00000", "fuse-self-00001")
    assert dag["train-clm"].deps == ("fuse-00000", "fuse-00001")  # CLM-only trains on FuseLLM's blocks
    assert dag["evaluate"].deps == ("prepare", "train", "train-clm", "train-self", "train-sources")
    # Adding a baseline adds tasks; it does not change FuseLLM's own fingerprints.
    plain = _spec(clmBaseline=False)
    for tid in ("fuse-00000", "train"):
        assert fingerprint(plain, {t.id: t for t in build_dag(plain)}[tid]) == fingerprint(spec, dag[tid])
    assert [v.value for v in Variant] == ["fused", "clm", "self", "sources"]


def test_stage_definitions_describe_the_pod_shape() -> None:
    accelerated = {s.value for s, d in STAGES.items() if d.accelerated}
    assert accelerated == {"extract", "train", "evaluate"}
    assert [s.value for s, d in STAGES.items() if d.distributed] == ["train"]
    kinds = {s.value: d.shard_kind for s, d in STAGES.items() if d.shard_kind}
    assert kinds == {"prepare": "raw", "extract": "extract", "align": "aligned", "fuse": "fused"}
