"""The FusionRun spec: one pydantic model, the single source of truth.

The operator, the CRD schema (generated from these classes, see `jobs.crd`), the stage jobs and the local
runner all read a FusionRun through these classes. Field names are camelCase on the wire (Kubernetes
convention) and snake_case in Python. Defaults follow the FuseLLM paper where it sets them (k=10,
lambda=0.9, MinED, MinCE). This module must stay light: the operator imports it, and never imports torch.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from fusion.uris import absolute_uri, is_s3
from jobs.kubeyaml import KubeYamlError, decode, load_yaml
from jobs.registry import STAGE_ORDER, Stage, Variant

API_GROUP = "fusionrun.dev"
API_VERSION = "v1alpha1"
KIND = "FusionRun"
PLURAL = "fusionruns"

# Patterns are read by pydantic (Rust regex) and by the API server (Go RE2): ASCII classes only, since
# \w and \d match non-ASCII letters and digits in Rust but not in Go.
# DNS-1123 label: names end up in Job names, labels and store keys.
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$"
_BUCKET = r"[A-Za-z0-9][A-Za-z0-9._-]*"  # an S3 bucket name begins with a letter or digit
MODEL_URI_PATTERN = (
    rf"^(file://|s3://{_BUCKET}|pkg://|hf://|/|\./|\.\./|[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$)"
)
STORE_URI_PATTERN = rf"^(s3://{_BUCKET}(/.*)?|(file://)?(/|\./|\.\./).*)$"
# http(s)://host[:port][/path]: no spaces, no user:password@ (keys belong in a Secret, not in the spec).
ENDPOINT_PATTERN = r"^https?://[A-Za-z0-9.:\[\]-]+(/[^\s?#]*)?$"
REGION_PATTERN = r"^([A-Za-z0-9][A-Za-z0-9_.-]*)?$"  # "" is the SDK default, as before
# What the API server stores for `type: integer` (a larger number is refused as "must be of type integer").
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _is_int_field(annotation: Any) -> bool:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return int in typing.get_args(annotation)
    return annotation is int


class Spec(BaseModel):
    """Base of every spec class: camelCase aliases, unknown fields rejected (typos fail loudly), and strict
    types as the API server applies them: no string becomes a number or a boolean, numbers are finite, and
    integers fit in 64 bits. Documents are parsed by their YAML names only (parse_spec, parse_fusionrun);
    Python code may build models by field name."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        extra="forbid",
        use_enum_values=True,
        strict=True,
        allow_inf_nan=False,
    )

    @field_validator("*", mode="before")
    @classmethod
    def _integers_as_kubernetes_stores_them(cls, v: Any, info: ValidationInfo) -> Any:
        """An integer field takes 5.0 as 5 (the API server does) and nothing beyond 64 bits (it refuses)."""
        if info.field_name is None or not _is_int_field(cls.model_fields[info.field_name].annotation):
            return v
        if isinstance(v, float) and math.isfinite(v) and v.is_integer():
            v = int(v)
        if isinstance(v, int) and not isinstance(v, bool) and not INT64_MIN <= v <= INT64_MAX:
            raise ValueError("is beyond the 64-bit integer range the Kubernetes API accepts")
        return v


# --------------------------------------------------------------------------------------------------
# Models


class RandomInit(Spec):
    """Build a small randomly initialised model instead of loading weights (tests, tiny examples).

    The vocabulary size follows the tokenizer, so any real tokenizer can be paired with it."""

    architecture: Literal["llama", "gpt_neox", "gemma3", "qwen2", "mistral"] = "llama"
    hidden_size: int = Field(64, ge=8, le=8192)
    num_layers: int = Field(2, ge=1, le=128)
    num_heads: int = Field(4, ge=1, le=128)
    intermediate_size: int | None = Field(None, ge=8)
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> RandomInit:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hiddenSize ({self.hidden_size}) must be a multiple of numHeads ({self.num_heads})"
            )
        return self


class ModelRef(Spec):
    """Where a model comes from.

    uri: a local folder (or file:// URI), an s3:// URI of a folder, pkg://<python package>/<sub path> for
    a folder shipped inside an installed Python package, or a Hugging Face id (org/name or hf://org/name,
    for clusters with hub access)."""

    name: str = Field(..., pattern=NAME_PATTERN, description="Short name used in Job names and store keys.")
    uri: str | None = Field(None, pattern=MODEL_URI_PATTERN, description="Model weights location.")
    gguf_file: str | None = Field(None, description="GGUF file name inside uri, for GGUF weights.")
    tokenizer: str | None = Field(
        None, pattern=MODEL_URI_PATTERN, description="Tokenizer location when it differs from uri."
    )
    revision: str | None = None
    random_init: RandomInit | None = Field(
        None, description="Random-init a model of this shape with the given tokenizer (no weights)."
    )
    add_bos: bool | None = Field(
        None,
        description="Start each document with BOS. Unset: follow the tokenizer's own default (Gemma and "
        "Llama-2 add it; models trained with it score far worse without it). false: the reference's no-BOS.",
    )

    @model_validator(mode="after")
    def _weights_or_random(self) -> ModelRef:
        if self.uri is None and self.random_init is None:
            raise ValueError("set either uri (model weights) or randomInit (a random-init model)")
        if self.random_init is not None and self.tokenizer is None and self.uri is None:
            raise ValueError(
                "randomInit needs a tokenizer: set tokenizer to a tokenizer folder or pkg:// URI"
            )
        return self

    @property
    def tokenizer_uri(self) -> str:
        return self.tokenizer or self.uri  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# Data


class CorpusFormat(str, Enum):
    auto = "auto"
    text = "text"
    jsonl = "jsonl"
    parquet = "parquet"
    hf_disk = "hf-disk"


class TextSource(Spec):
    """Where documents are read from: the training corpus and the extra evaluation texts alike."""

    uri: str = Field(..., description="File or folder of documents: local path, file:// or s3:// URI.")
    format: CorpusFormat = Field(CorpusFormat.auto, strict=False)  # strict takes only Enum instances
    text_field: str = Field("text", description="Field holding the text (jsonl, parquet, hf-disk).")
    glob: str | None = Field(None, description="For folders: which files to read, e.g. '**/*.py'.")
    max_documents: int | None = Field(None, ge=1)
    max_bytes: int | None = Field(None, ge=1, description="Stop reading after this many bytes of text.")


class Corpus(TextSource):
    heldout_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="Share of documents kept out of training for evaluation."
    )
    seed: int = 0


class Extraction(Spec):
    top_k: int = Field(10, ge=1, le=256, description="Next-token entries kept per position.")
    max_length: int = Field(
        2048, ge=16, le=131072, description="Longest sequence in tokens, under every tokenizer."
    )
    batch_tokens: int = Field(8192, ge=16, description="Tokens per forward batch (length-bucketed).")
    shards: int = Field(1, ge=1, le=4096, description="Shards per model: the unit of parallel work.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on GPUs that support it, float32 on CPU."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"


class Alignment(Spec):
    method: Literal["mined", "em", "exact"] = Field(
        "exact",
        description="exact (the default): pair positions whose preceding text is byte-for-byte the same; "
        "mined / em: the paper's DTW token alignment, accepting pairs by minimum edit distance or exact "
        "match (docs/results.md: exact + continuation beat it on every held-out text, trained).",
    )
    vocab_map: Literal["lazy", "full"] = Field(
        "lazy", description="lazy: map only source ids seen in extracted top-k; full: the whole vocab."
    )
    projection: Literal["spelling", "continuation"] | None = Field(
        None,
        description="How a source token becomes target tokens. continuation (exact's default): a source "
        "token whose continuations the target holds as longer tokens (the source tokenizer spells them "
        "starting with it: Mistral '▁rail' -> SmolLM2 ' railroad') shares its probability among them in "
        "proportion to the target's own probabilities; spelling (the only one for mined / em, their "
        "default): each source token goes to the target token that spells its text first.",
    )

    @model_validator(mode="after")
    def _projection_for_method(self) -> Alignment:
        if self.projection is None:  # resolved here, so fingerprints and status name what ran
            self.projection = "continuation" if self.method == "exact" else "spelling"
        if self.projection != "spelling" and self.method != "exact":
            raise ValueError(
                f"projection {self.projection!r} applies to method 'exact' only (method is {self.method!r}): "
                "set method: exact, or remove projection"
            )
        return self


class Fusion(Spec):
    strategy: Literal["minCE", "avgCE"] = "minCE"
    level: Literal["sequence", "token"] = "sequence"
    ce_unit: Literal["byte", "token"] = Field(
        "byte",
        description="byte: bits per byte (fair across tokenizers); token: the reference's per-token CE.",
    )
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    include_target: bool = Field(True, description="The target's own distribution is a fusion candidate.")
    ce_on: Literal["own", "target"] = Field(
        "own",
        description="What MinCE / AvgCE compare: own: each model's CE on its own tokenization (the paper); "
        "target: each candidate's CE on the target's tokens as it would be fused (aligned, truncated to its "
        "entries, projected): a source strong on its own tokens can be weak once aligned.",
    )
    fallback: Literal["onehot", "target"] = Field(
        "onehot",
        description="Where a source has no distribution (positions alignment could not pair): onehot: the "
        "gold token (the CLM label again, as the paper); target: the target's own distribution.",
    )
    top_k: int | None = Field(
        None,
        ge=1,
        description="Entries of each candidate's distribution used (its most likely; at most "
        "extraction.topK; default all extracted): ablate k without extracting again.",
    )


class Training(Spec):
    lambda_: float = Field(
        0.9,
        alias="lambda",
        ge=0.0,
        le=1.0,
        description="Weight of the causal-LM loss; 1 - lambda the fusion loss.",
    )
    lambda_final: float | None = Field(
        None,
        alias="lambdaFinal",
        ge=0.0,
        le=1.0,
        description="Weight of the causal-LM loss at the last step: it moves linearly from lambda at the "
        "first step to this (e.g. 0.5 -> 1.0: the teacher early, the data late). Unset: lambda throughout.",
    )
    loss: Literal["ce", "kl"] = Field("ce", description="Fusion loss: soft-label cross-entropy or KL.")
    learning_rate: float = Field(1e-5, gt=0.0, le=1.0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.008, ge=0.0, le=1.0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    weight_decay: float = Field(0.1, ge=0.0)
    betas: tuple[float, float] = Field((0.9, 0.95), strict=False)  # a YAML list; its items stay strict
    grad_clip: float = Field(1.0, ge=0.0)
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; default: one pass (epochs).")
    epochs: float = Field(1.0, gt=0.0)
    micro_batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(16, ge=1)
    seq_len: int = Field(2048, ge=16)
    zero_stage: int = Field(2, ge=0, le=3)
    nodes: int = Field(1, ge=1, le=1024)
    procs_per_node: int = Field(1, ge=1, le=64, description="Processes per node: one per GPU.")
    gradient_checkpointing: bool = False
    checkpoint_interval: int = Field(500, ge=1, description="Save a resumable checkpoint every N steps.")
    seed: int = 42
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    clm_baseline: bool = Field(
        False, description="Also train a CLM-only model (lambda=1) on the same data, steps and seed."
    )
    self_distill_baseline: bool = Field(
        False,
        description="Also train with the target's own distribution as the only teacher (self-distillation), "
        "same data, steps and seed: the baseline that tells a source's knowledge from regularisation.",
    )
    sources_only_baseline: bool = Field(
        False,
        description="Also train with the sources alone as teachers (the target's own distribution left out "
        "of the fusion), same data, steps and seed.",
    )

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v


class EvalCorpus(TextSource):
    """A further held-out text, read whole (no split), e.g. another domain than the training corpus."""

    name: str = Field(
        ...,
        pattern=r"^[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?$",
        description="Label of its results in evaluate/metrics.json and the report.",
    )


TASK_DIR_PATTERN = rf"^(file://|s3://{_BUCKET}|/|\./|\.\./)"


# What evaluate calls the models it scores: the target before training, each trained variant, each source.
SCORED_MODEL_PATTERN = r"^(target-before|source:[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?|[a-z]{1,32})$"


class BenchmarkTask(Spec):
    """A task of EleutherAI's lm-evaluation-harness, scored on every model of the run."""

    name: str = Field(
        ...,
        pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.:+-]{0,199}$",
        description="lm-eval task, group or tag name: one lm-eval ships (e.g. hellaswag) or one defined in "
        "evaluation.taskDirs.",
    )
    num_fewshot: int = Field(0, ge=0, le=100, description="Examples in the prompt (lm-eval's --num_fewshot).")
    limit: int | None = Field(
        None,
        ge=1,
        description="Score only the first N documents (lm-eval's --limit): a quick check, not the benchmark.",
    )
    models: list[Annotated[str, Field(pattern=SCORED_MODEL_PATTERN)]] | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="Score this task on these models only (a costly task on the models being compared): "
        "target-before, fused, clm, self, sources, source:<name>. Default: every model the run evaluates.",
    )


class Evaluation(Spec):
    enabled: bool = True
    max_documents: int | None = Field(None, ge=1)
    evaluate_sources: bool = Field(True, description="Also score each source on its own tokenization.")
    corpora: list[EvalCorpus] = Field(
        default_factory=list,
        max_length=16,
        description="More held-out texts scored like the corpus's held-out split, each read whole: e.g. "
        "another domain, to see what training on the corpus costs or gains elsewhere.",
    )

    tasks: list[BenchmarkTask] = Field(
        default_factory=list,
        max_length=64,
        description="lm-evaluation-harness tasks scored on the target before training, FuseLLM, each trained "
        'baseline and (evaluateSources) each source; results under "tasks" in evaluate/metrics.json.',
    )
    task_dirs: list[Annotated[str, Field(pattern=TASK_DIR_PATTERN)]] = Field(
        default_factory=list,
        max_length=16,
        description="Folders of your own lm-eval task YAMLs and their data files (local path, file:// or "
        "s3://): relative data paths in a YAML are relative to its folder; no hub access needed.",
    )

    @field_validator("corpora")
    @classmethod
    def _unique_corpus_names(cls, v: list[EvalCorpus]) -> list[EvalCorpus]:
        names = [c.name for c in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"evaluation corpus names must be unique; repeated: {dupes}")
        return v

    @field_validator("tasks")
    @classmethod
    def _unique_task_names(cls, v: list[BenchmarkTask]) -> list[BenchmarkTask]:
        names = [t.name for t in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(
                f"evaluation task names must be unique (results are keyed by name); repeated: {dupes}"
            )
        return v

    @model_validator(mode="after")
    def _task_dirs_need_tasks(self) -> Evaluation:
        if self.task_dirs and not self.tasks:
            raise ValueError(
                "taskDirs is set but tasks is empty: list the tasks to score in evaluation.tasks"
            )
        return self


# --------------------------------------------------------------------------------------------------
# Where artifacts go, and Kubernetes knobs


# A Secret a FusionRun may name carries this label with the value "true": its owner's consent that FusionRun
# Jobs (and the operator, to read the run's store) use its keys. The operator refuses any other Secret.
SECRET_OPT_IN_LABEL = f"{API_GROUP}/store-credentials"
SECRET_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"  # a DNS-1123 subdomain, as Secret names are
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]{1,253}$"  # what a Secret's data keys may be


class SecretKeyRef(Spec):
    name: str = Field(
        ...,
        pattern=SECRET_NAME_PATTERN,
        description=f"Secret name in the FusionRun's namespace; it must carry the label "
        f'{SECRET_OPT_IN_LABEL}: "true".',
    )
    access_key_key: str = Field("AWS_ACCESS_KEY_ID", pattern=SECRET_KEY_PATTERN)
    secret_key_key: str = Field("AWS_SECRET_ACCESS_KEY", pattern=SECRET_KEY_PATTERN)


class StoreSpec(Spec):
    uri: str = Field(
        "file://./runs", pattern=STORE_URI_PATTERN, description="Local folder or s3://bucket/prefix."
    )
    endpoint: str | None = Field(
        None,
        pattern=ENDPOINT_PATTERN,
        description="S3 endpoint URL for MinIO, SeaweedFS, Ceph...: http(s)://host[:port][/path].",
    )
    region: str | None = Field(None, pattern=REGION_PATTERN)
    insecure: bool = Field(False, description="Allow plain http:// endpoints.")
    credentials_secret: SecretKeyRef | None = Field(
        None, description="S3 keys from a Secret; unset: the pod's cloud identity (IRSA, workload identity)."
    )

    @model_validator(mode="after")
    def _http_needs_insecure(self) -> StoreSpec:
        if self.endpoint and self.endpoint.startswith("http://") and not self.insecure:
            raise ValueError("endpoint is plain http://: set insecure: true to allow it, or use https://")
        return self

    @property
    def is_s3(self) -> bool:
        return is_s3(self.uri)


class Toleration(Spec):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class StageResources(Spec):
    cpu: str | None = Field(None, pattern=r"^[0-9]+(\.[0-9]+)?m?$")
    memory: str | None = Field(None, pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$")
    gpus: int | None = Field(
        None,
        ge=0,
        le=64,
        description="GPUs per pod. Unset: the operator's stage default, else none. 0: none, whatever the "
        "default.",
    )
    gpu_resource: str = "nvidia.com/gpu"
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    parallelism: int | None = Field(
        None,
        ge=1,
        le=100000,
        description="Per-shard stages (extract, align, fuse): at most this many pods of one model's (or "
        "variant's) shards run at once. Unset: the operator's stage default, else 32. Others ignore it.",
    )


# One field per stage of the registry (jobs.registry): a stage added there gets its resources here.
Resources = create_model(
    "Resources",
    __base__=Spec,
    __doc__="Pod resources and placement per stage.",
    **{s.value: (StageResources, Field(default_factory=StageResources)) for s in STAGE_ORDER},
)


class Retry(Spec):
    max_attempts: int = Field(3, ge=1, le=100, description="Attempts per stage task before the run fails.")
    backoff_seconds: int = Field(10, ge=0, le=3600, description="First retry delay; doubles each attempt.")
    restart_from: Stage | None = Field(
        None,
        strict=False,  # strict takes only Enum instances
        description="Rerun from this stage: clears failures there and after; finished earlier stages stay.",
    )
    restart_nonce: str | None = Field(None, description="Change to trigger another restartFrom.")


class FusionRunSpec(Spec):
    target: ModelRef
    sources: list[ModelRef] = Field(..., min_length=1, max_length=16)
    corpus: Corpus
    extraction: Extraction = Field(default_factory=Extraction)
    alignment: Alignment = Field(default_factory=Alignment)
    fusion: Fusion = Field(default_factory=Fusion)
    training: Training = Field(default_factory=Training)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    store: StoreSpec = Field(default_factory=StoreSpec)
    resources: Resources = Field(default_factory=Resources)
    retry: Retry = Field(default_factory=Retry)
    image: str | None = Field(None, description="Job image; default: the operator's configured job image.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    service_account_name: str | None = None
    suspend: bool = Field(False, description="Stop creating Jobs and delete running ones; resume with false.")
    active_deadline_seconds: int | None = Field(None, ge=1, description="Fail the run after this long.")
    ttl_seconds_after_finished: int | None = Field(None, ge=0, description="Delete finished Jobs after this.")
    queue_name: str | None = Field(None, description="Kueue queue: sets kueue.x-k8s.io/queue-name on Jobs.")
    priority_class_name: str | None = Field(
        None,
        description="PriorityClass of the stage pods (scheduling and preemption); Kueue also takes it as the "
        "Jobs' workload priority unless workloadPriorityClassName is set.",
    )
    workload_priority_class_name: str | None = Field(
        None,
        description="Kueue WorkloadPriorityClass: sets kueue.x-k8s.io/priority-class on Jobs (queueing order "
        "and Kueue preemption only; the pods' own priority stays priorityClassName's).",
    )
    delete_artifacts: bool = Field(
        False, description="Delete the run's artifacts when the FusionRun is deleted."
    )

    @model_validator(mode="after")
    def _unique_model_names(self) -> FusionRunSpec:
        names = [self.target.name, *(s.name for s in self.sources)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique across target and sources; repeated: {dupes}")
        if self.training.seq_len > self.extraction.max_length:
            raise ValueError(
                f"training.seqLen ({self.training.seq_len}) exceeds extraction.maxLength "
                f"({self.extraction.max_length}): raise extraction.maxLength or lower training.seqLen"
            )
        if self.fusion.top_k is not None and self.fusion.top_k > self.extraction.top_k:
            raise ValueError(
                f"fusion.topK ({self.fusion.top_k}) exceeds extraction.topK ({self.extraction.top_k}): only "
                "the extracted entries exist; lower fusion.topK or raise extraction.topK (re-extracts)"
            )
        if self.training.sources_only_baseline and not self.fusion.include_target:
            raise ValueError(
                "training.sourcesOnlyBaseline: with fusion.includeTarget false the FuseLLM model already "
                "learns from the sources alone; drop sourcesOnlyBaseline or set includeTarget true"
            )
        self._task_models_are_scored()
        return self

    def trained_variants(self) -> list[str]:
        """The variants the run trains: FuseLLM, then each baseline the spec asks for."""
        t = self.training
        wanted = {
            Variant.fused: True,
            Variant.clm: t.clm_baseline,
            Variant.self: t.self_distill_baseline,
            Variant.sources: t.sources_only_baseline,
        }
        return [v.value for v, on in wanted.items() if on]

    def scored_models(self) -> list[str]:
        """What evaluate scores, by the names its results use: the target before training, each trained
        variant, then (evaluateSources) each source."""
        sources = [f"source:{m.name}" for m in self.sources] if self.evaluation.evaluate_sources else []
        return ["target-before", *self.trained_variants(), *sources]

    def _task_models_are_scored(self) -> None:
        known = self.scored_models()
        for i, task in enumerate(self.evaluation.tasks):
            unknown = [m for m in task.models or [] if m not in known]
            if unknown:
                raise ValueError(
                    f"evaluation.tasks[{i}].models: {unknown} not scored by this run; choose from {known} "
                    "(a baseline needs its training.*Baseline, a source evaluation.evaluateSources)"
                )

    @property
    def models(self) -> list[ModelRef]:
        """Target first, then sources, in spec order: the order of extraction and of fusion candidates."""
        return [self.target, *self.sources]

    def model(self, name: str) -> ModelRef:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(f"no model named {name!r}; known: {[m.name for m in self.models]}")


class Metadata(Spec):
    """ObjectMeta as a FusionRun document may carry it: the API server drops any other key."""

    model_config = ConfigDict(alias_generator=None)  # ObjectMeta's own names
    name: str = Field(..., pattern=r"^[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?$")
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    # Written by the API server; present in `kubectl get -o yaml` output, accepted and ignored here.
    generateName: str | None = None
    uid: Any = None
    resourceVersion: Any = None
    generation: Any = None
    creationTimestamp: Any = None
    deletionTimestamp: Any = None
    deletionGracePeriodSeconds: Any = None
    ownerReferences: Any = None
    finalizers: Any = None
    managedFields: Any = None
    selfLink: Any = None
    clusterName: Any = None


class FusionRun(Spec):
    """A whole FusionRun document as `kubectl apply -f` takes it."""

    model_config = ConfigDict(alias_generator=None)
    api_version: str = Field(..., alias="apiVersion")
    kind: Literal["FusionRun"] = Field(..., alias="kind")
    metadata: Metadata
    spec: FusionRunSpec
    status: Any = Field(None, description="Written by the operator; ignored in a document.")

    @field_validator("api_version")
    @classmethod
    def _known_version(cls, v: str) -> str:
        if v != f"{API_GROUP}/{API_VERSION}":
            raise ValueError(f"apiVersion must be {API_GROUP}/{API_VERSION}")
        return v


# --------------------------------------------------------------------------------------------------
# Loading and clear errors


class SpecError(ValueError):
    """A FusionRun that does not validate; the message names every bad field and what is allowed."""


UNKNOWN_FIELD = "unknown field"


def _fields_at(model: Any, loc: tuple[Any, ...]) -> list[str]:
    """The field names (YAML spelling) a mapping at `loc` under `model` may have; [] when unknown."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        if field is None:
            return []
        model = _model_of(field.annotation)
        if model is None:
            return []
    return [f.alias or n for n, f in model.model_fields.items()]


def _model_of(annotation: Any) -> Any:
    """The pydantic model inside an annotation (X, X | None, list[X]), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for a in typing.get_args(annotation) if (m := _model_of(a)) is not None), None)


def _did_you_mean(root: Any, loc: tuple[Any, ...]) -> str:
    """'; did you mean X?' for an unknown field name, when one known name is close (or its camelCase)."""
    name = str(loc[-1])
    known = _fields_at(root, loc[:-1])
    close = [to_camel(name)] if to_camel(name) in known else difflib.get_close_matches(name, known, n=1)
    return f"; did you mean {close[0]}?" if close else ""


def _error_lines(err: ValidationError, root: str, model: Any) -> list[str]:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p != "__root__")
        loc = f"{root}.{loc}" if root and loc else (root or loc or "(document)")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = UNKNOWN_FIELD + _did_you_mean(model, tuple(e["loc"]))
        got = e.get("input")
        got_s = (
            ""
            if isinstance(got, dict | list) or got is None or e["type"] == "extra_forbidden"
            else f" (got {got!r})"
        )
        lines.append(f"{loc}: {msg}{got_s}")
    return lines


def format_validation_error(err: ValidationError, root: str = "", model: Any = None) -> str:
    lines = _error_lines(err, root, model or (FusionRunSpec if root == "spec" else FusionRun))
    return "invalid FusionRun:\n  " + "\n  ".join(lines)


def _without_nulls(node: Any) -> Any:
    """A document as the API server keeps it: a key whose value is null is absent (structural pruning)."""
    if isinstance(node, dict):
        return {k: _without_nulls(v) for k, v in node.items() if v is not None}
    if isinstance(node, list):
        return [_without_nulls(v) for v in node]
    return node


def parse_fusionrun(doc: dict[str, Any]) -> FusionRun:
    """A whole document, strictly and by its YAML names: what the API server and the operator accept."""
    try:
        return FusionRun.model_validate(_without_nulls(doc), by_alias=True, by_name=False)
    except ValidationError as err:
        raise SpecError(format_validation_error(err)) from None


def parse_spec(spec: dict[str, Any]) -> FusionRunSpec:
    """A FusionRun's .spec, strictly and by its YAML names (see parse_fusionrun)."""
    try:
        return FusionRunSpec.model_validate(_without_nulls(spec), by_alias=True, by_name=False)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, root="spec")) from None


def unknown_fields(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(dotted path, "unknown field; did you mean X?") for every key of a FusionRun document that
    FusionRun does not know (the API server prunes those). Other errors are not reported here."""
    try:
        FusionRun.model_validate(_without_nulls(doc), by_alias=True, by_name=False)
    except ValidationError as err:
        return [
            (".".join(str(p) for p in e["loc"]), UNKNOWN_FIELD + _did_you_mean(FusionRun, tuple(e["loc"])))
            for e in err.errors()
            if e["type"] == "extra_forbidden"
        ]
    return []


def read_document(path: str | Path, warnings: list[str] | None = None) -> Any:
    """The YAML document in a file, read as kubectl reads it (jobs.kubeyaml: what kubectl does silently, a
    key written twice or bytes that are not UTF-8, goes into `warnings`); SpecError, naming the file once,
    when it cannot be read or parsed."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{path}: no such FusionRun file") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a folder; give the FusionRun YAML file") from None
    except OSError as err:
        raise SpecError(f"{path}: cannot be read ({err.strerror or type(err).__name__})") from None
    try:
        return load_yaml(decode(data, warnings), warnings)
    except KubeYamlError as err:
        raise SpecError(f"{path}: not valid YAML: {err}") from None


def load_fusionrun(path: str | Path, warnings: list[str] | None = None) -> FusionRun:
    """Read a FusionRun YAML file; relative local paths in it are resolved against the file's folder.
    Every SpecError names the file once, at the start; `warnings` as read_document."""
    path = Path(path)
    doc = read_document(path, warnings)
    if not isinstance(doc, dict):
        raise SpecError(f"{path}: expected a FusionRun mapping with apiVersion, kind, metadata and spec")
    try:
        run = parse_fusionrun(doc)
    except SpecError as err:
        raise SpecError(f"{path}: {err}") from None
    return run.model_copy(update={"spec": resolve_relative_paths(run.spec, path.parent.resolve())})


def resolve_relative_paths(spec: FusionRunSpec, base: Path) -> FusionRunSpec:
    """Make ./relative local URIs absolute so that a run does not depend on the caller's directory."""

    def fix(uri: str | None) -> str | None:
        return absolute_uri(uri, base)

    data = spec.model_dump(by_alias=True)
    for m in [data["target"], *data["sources"]]:
        m["uri"] = fix(m["uri"])
        m["tokenizer"] = fix(m["tokenizer"])
    data["corpus"]["uri"] = fix(data["corpus"]["uri"])
    for c in data["evaluation"]["corpora"]:
        c["uri"] = fix(c["uri"])
    data["evaluation"]["taskDirs"] = [fix(d) for d in data["evaluation"]["taskDirs"]]
    data["store"]["uri"] = fix(data["store"]["uri"])
    return FusionRunSpec.model_validate(data)
