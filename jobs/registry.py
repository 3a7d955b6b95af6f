"""The stage registry: every fact about a stage, in one place.

Each stage's name (the same in the spec, the task id, the Job's name and labels, the status entry, the
store's key prefix and the CLI), its tasks' identity (which of model / shard / variant a task has) and
command-line arguments, its store keys (`Layout`, the artifact layout), its status condition, its default
pod shape, and the spec fields that fingerprint it. The spec's `resources`, the status model, the
operator's Kubernetes objects, the CLI and the planner (jobs.plan) all derive from this module, so adding
or renaming a stage happens here.

Torch-free and spec-free at import time: jobs.spec and the operator import it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Stage(str, Enum):
    prepare = "prepare"
    extract = "extract"
    align = "align"
    fuse = "fuse"
    train = "train"
    evaluate = "evaluate"


class Variant(str, Enum):
    """What a training run learns from. `fused` is FuseLLM; the others are the baselines that tell whether
    fusing other models' knowledge is what helped."""

    fused = "fused"  # the fusion of the spec's candidates (the target, when fusion.includeTarget, + sources)
    clm = "clm"  # causal-LM loss only: plain continual training on the same blocks
    self = "self"  # self-distillation: the target's own distribution as the only teacher
    sources = "sources"  # the sources alone as teachers (the target's own distribution left out)


# The baselines FuseLLM is compared with (evaluate's `fused_minus_<baseline>` figures), in that order.
BASELINES: tuple[str, ...] = tuple(v.value for v in Variant if v is not Variant.fused)

# Variants whose training needs fused shards of their own (clm trains on the fused variant's blocks: CLM-only
# training reads the fused variant's shards, so fuse has no clm).
FUSE_VARIANTS: tuple[Variant, ...] = (Variant.fused, Variant.self, Variant.sources)


@dataclass(frozen=True)
class StageDef:
    stage: Stage
    condition: str  # status condition type when the stage is done (a state, not a transition)
    per_model: bool = False  # one task per model (extract: every model; align: every source)
    sources_only: bool = False  # per_model over the sources only (align: the target is what they meet)
    per_shard: bool = False  # one task per shard
    variants: tuple[Variant, ...] = ()  # one task per variant it has (fuse: FUSE_VARIANTS; train: all)
    accelerated: bool = False  # runs model forward/backward passes: a GPU helps, /dev/shm is needed
    distributed: bool = False  # several ranks (DeepSpeed) that start and fail together: it starts them
    cacheable: bool = False  # outputs shared across runs by content (jobs.cache: extract once, fuse many)
    shard_kind: str | None = None  # the fusion.format kind of the shards it writes
    doc: str = ""

    @property
    def per_variant(self) -> bool:
        return bool(self.variants)

    @property
    def module(self) -> str:
        """The stage's entrypoint module (`run(ctx)`; a distributed stage: `main(argv)`)."""
        return f"jobs.stages.{self.stage.value}"


STAGES: Mapping[Stage, StageDef] = {
    d.stage: d
    for d in (
        StageDef(
            Stage.prepare,
            "Prepared",
            cacheable=True,
            shard_kind="raw",
            doc="corpus -> documents that fit every model, held-out split",
        ),
        StageDef(
            Stage.extract,
            "Extracted",
            per_model=True,
            per_shard=True,
            accelerated=True,
            cacheable=True,
            shard_kind="extract",
            doc="one model's top-k next-token log-probabilities over one shard",
        ),
        StageDef(
            Stage.align,
            "Aligned",
            per_model=True,
            sources_only=True,
            per_shard=True,
            cacheable=True,
            shard_kind="aligned",
            doc="one source's predictions moved onto the target's tokens",
        ),
        StageDef(
            Stage.fuse,
            "Fused",
            per_shard=True,
            variants=FUSE_VARIANTS,
            shard_kind="fused",
            doc="training targets",
        ),
        StageDef(
            Stage.train,
            "Trained",
            variants=tuple(Variant),
            accelerated=True,
            distributed=True,
            doc="continual training of the target (DeepSpeed)",
        ),
        StageDef(
            Stage.evaluate,
            "Evaluated",
            accelerated=True,
            doc="held-out bits per byte and benchmark tasks of every model",
        ),
    )
}
STAGE_ORDER: tuple[Stage, ...] = tuple(Stage)
STAGE_NAMES: tuple[str, ...] = tuple(s.value for s in Stage)
CONDITIONS: Mapping[str, str] = {s.value: d.condition for s, d in STAGES.items()}


@dataclass(frozen=True)
class Task:
    """One unit of work (and of retry, and of skipping): a stage for one model / shard / variant."""

    stage: Stage
    model: str | None = None  # extract: any model; align: a source
    shard: int | None = None  # extract, align, fuse
    variant: str | None = None  # fuse and train: a Variant value
    deps: tuple[str, ...] = field(default=(), compare=False)

    @property
    def id(self) -> str:
        parts = [self.stage.value]
        if self.variant and self.variant != Variant.fused.value:
            parts.append(self.variant)
        if self.model:
            parts.append(self.model)
        if self.shard is not None:
            parts.append(f"{self.shard:05d}")
        return "-".join(parts)

    def args(self, from_index: bool = False) -> list[str]:
        """Command-line arguments after `python -m jobs` that run exactly this task. from_index: the shard
        comes from the pod's completion index instead (`--shard-from-index`, one Indexed Job per group)."""
        a = [self.stage.value]
        if self.model:
            a += ["--model", self.model]
        if self.shard is not None:
            a += ["--shard-from-index"] if from_index else ["--shard", str(self.shard)]
        if self.variant and (self.stage is Stage.train or self.variant != Variant.fused.value):
            a += ["--variant", self.variant]
        return a

    @property
    def group(self) -> str:
        """The task's group: per-shard tasks of one stage and model / variant share one (`extract-target`,
        `fuse`, `fuse-self`), which is what one Indexed Job runs; any other task is a group of its own."""
        if self.shard is None:
            return self.id
        return Task(self.stage, self.model, None, self.variant).id

    @property
    def definition(self) -> StageDef:
        return STAGES[self.stage]

    @property
    def distributed(self) -> bool:
        return self.definition.distributed


class Layout:
    """The artifact layout: every store key of a run, relative to `<store uri>/<run name>/`.

    No other module formats a store key: stages ask their context for a task's outputs and inputs, and
    the context asks here."""

    SPEC = "spec.json"  # the spec the run's tasks last ran with (`fusionrun status/report NAME`)
    STATUS = "status.json"  # the local runner's task records (the operator keeps them in the FusionRun)
    HELDOUT = "prepare/heldout.safetensors"
    METRICS = "evaluate/metrics.json"
    REPORT = "report"
    LOGS = "logs"

    @staticmethod
    def stage_prefix(stage: Stage) -> str:
        """Every key of a stage (of the run's tasks) starts with it."""
        return f"{stage.value}/"

    @staticmethod
    def documents(shard: int) -> str:
        """Prepared training documents of one shard (written by prepare, read by that shard's tasks)."""
        return f"prepare/shard-{shard:05d}.safetensors"

    @staticmethod
    def shard(task: Task) -> str:
        """The data shard a per-shard task writes (extract, align, fuse)."""
        if task.shard is None:
            raise ValueError(f"task {task.id} has no shard")
        name = f"shard-{task.shard:05d}.safetensors"
        if task.stage in (Stage.extract, Stage.align):
            return f"{task.stage.value}/{task.model}/{name}"
        if task.stage is Stage.fuse:
            return f"fuse/{_variant_dir(task.variant)}{name}"
        raise ValueError(f"stage {task.stage.value} writes no shard")

    @staticmethod
    def manifest(task: Task) -> str:
        """Where a task's completion record lives (jobs.complete)."""
        st = task.stage
        if st in (Stage.extract, Stage.align, Stage.fuse):
            return Layout.shard(task).removesuffix(".safetensors") + ".manifest.json"
        if st is Stage.train:
            return f"{Layout.train_prefix(task.variant)}/manifest.json"
        return f"{st.value}/manifest.json"

    @staticmethod
    def source_value(task: Task) -> str:
        """Beside a FuseLLM fuse shard: the source-value diagnostics of its shard (fusion.diagnostics)."""
        return Layout.shard(task).removesuffix(".safetensors") + ".source-value.json"

    @staticmethod
    def vocab_map(source: str) -> str:
        """A source's MinED/EM vocabulary map (a cache shared by its align tasks)."""
        return f"align/{source}/vocab-map.npz"

    @staticmethod
    def projection(source: str) -> str:
        """A source's projection onto the target vocabulary by spelling (exact alignment's cache)."""
        return f"align/{source}/projection.npz"

    @staticmethod
    def train_prefix(variant: str | None) -> str:
        return f"train/{variant or Variant.fused.value}"

    @staticmethod
    def model_prefix(variant: str | None) -> str:
        """The trained model of a variant, in Hugging Face format (a folder of objects)."""
        return f"{Layout.train_prefix(variant)}/model/"

    @staticmethod
    def checkpoints(variant: str | None) -> str:
        return f"{Layout.train_prefix(variant)}/checkpoints"

    @staticmethod
    def progress(variant: str | None) -> str:
        return f"{Layout.train_prefix(variant)}/progress.json"

    @staticmethod
    def history(variant: str | None) -> str:
        return f"{Layout.train_prefix(variant)}/history.jsonl"

    @staticmethod
    def task_scores(label: str) -> str:
        """One model's benchmark-task scores (evaluate keeps them per model: a rerun scores what is missing).
        label: target-before, a trained variant, or source:NAME."""
        return f"evaluate/tasks/{label.replace(':', '-')}.json"

    @staticmethod
    def log(task_id: str) -> str:
        return f"{Layout.LOGS}/{task_id}.log"


class CacheLayout:
    """The keys of the shared cache area (jobs.cache: outputs of the cacheable stages shared across runs by
    content), relative to `<store uri>/_cache/`. An entry is `<stage>/<kk>/<key>/`: its output files, then
    `entry.json` last, its users `users/<run>`, and while a task makes it `lease.json`."""

    AREA = "_cache"  # beside the runs' prefixes; not a valid run name (DNS label), so never a run's
    ENTRY, LEASE, USERS = "entry.json", "lease.json", "users"

    @staticmethod
    def entry(stage: Stage, key: str) -> str:
        return f"{stage.value}/{key[:2]}/{key}"

    @staticmethod
    def file(stage: Stage, logical_key: str) -> str:
        """The file name in an entry of a task's output (`logical_key`, the run's Layout key). A per-shard
        task has one output, named the same whatever the run calls its model or shard; a stage's other
        outputs keep their names (prepare's name no model: Layout.documents, HELDOUT)."""
        return "shard.safetensors" if STAGES[stage].per_shard else logical_key.rsplit("/", 1)[-1]

    @staticmethod
    def logical_key(task: Task, name: str) -> str:
        """The inverse of `file` for one run's task: the run's Layout key of the entry's file `name`."""
        return Layout.shard(task) if task.definition.per_shard else Layout.stage_prefix(task.stage) + name

    @staticmethod
    def at(entry: str, name: str) -> str:
        """A file or record (ENTRY, LEASE, a user) of the entry at `entry` (CacheLayout.entry)."""
        return f"{entry}/{name}"

    @staticmethod
    def user(entry: str, run: str) -> str:
        """The record that `run` uses the entry."""
        return f"{entry}/{CacheLayout.USERS}/{run}"

    @staticmethod
    def identity(kind: str, ref_digest: str) -> str:
        """A recorded content identity (a model, a tokenizer, the corpus) of a spec-level reference."""
        return f"identities/{kind}/{ref_digest}.json"


def _variant_dir(variant: str | None) -> str:
    """fuse/ holds the FuseLLM shards (as before variants existed); other variants get a subfolder."""
    return "" if variant in (None, Variant.fused.value) else f"{variant}/"


# --------------------------------------------------------------------------------------------------
# Fingerprints: the spec fields that decide a stage's outputs (a change invalidates them)

_MODEL_FIELDS = ("uri", "ggufFile", "tokenizer", "revision", "randomInit", "addBos")


def fingerprint_fields(spec_json: Mapping[str, Any], task: Task) -> dict[str, Any]:
    """The parts of the spec (as `model_dump(mode="json", by_alias=True)`) that decide `task`'s outputs.

    A field added after 0.1 counts only when set, so that outputs made before it stay valid."""
    d = spec_json
    models = {m["name"]: {k: m.get(k) for k in _MODEL_FIELDS} for m in [d["target"], *d["sources"]]}
    stage = task.stage
    if stage is Stage.prepare:
        return {
            "corpus": d["corpus"],
            "maxLength": d["extraction"]["maxLength"],
            "shards": d["extraction"]["shards"],
            "tokenizers": {n: m["tokenizer"] or m["uri"] for n, m in models.items()},
        }
    if stage is Stage.extract:
        # One model's extraction depends on that model only: editing another redoes only that one.
        return {"models": {task.model: models[task.model]}, "topK": d["extraction"]["topK"]}
    if stage is Stage.align:
        return {"alignment": _set_only(d["alignment"], {"projection": "spelling"})}
    if stage is Stage.fuse:
        return {"fusion": _set_only(d["fusion"], {"topK": None, "ceOn": "own", "fallback": "onehot"})}
    if stage is Stage.train:
        # Which baselines exist decides which tasks there are, not what any one of them trains.
        training = _set_only(d["training"], {"lambdaFinal": None})
        return {"training": {k: v for k, v in training.items() if k not in _TRAIN_UNFINGERPRINTED}}
    evaluation = _set_only(d["evaluation"], {"corpora": [], "tasks": [], "taskDirs": []})
    if "tasks" in evaluation:  # a task's models (added later) count only when set
        evaluation["tasks"] = [_set_only(t, {"models": None}) for t in evaluation["tasks"]]
    return {"evaluation": evaluation}


_TRAIN_UNFINGERPRINTED = ("checkpointInterval", "clmBaseline", "selfDistillBaseline", "sourcesOnlyBaseline")


def legacy_fingerprint_fields(spec_json: Mapping[str, Any], task: Task) -> list[dict[str, Any]]:
    """The fields earlier releases fingerprinted `task` by, where they differ from fingerprint_fields':
    their manifests stay valid (jobs.complete accepts either), so upgrading redoes nothing.

    Train: training.clmBaseline used to count in every variant's fingerprint, so turning the CLM-only
    baseline on retrained FuseLLM and the other baselines; such a record may hold either value. (A training
    checkpoint of such a release, mid-run at the upgrade, is not resumed: its marker names the old one.)"""
    if task.stage is not Stage.train:
        return []
    current = fingerprint_fields(spec_json, task)["training"]
    return [{"training": {**current, "clmBaseline": flag}} for flag in (True, False)]


def _set_only(section: Mapping[str, Any], later: Mapping[str, Any]) -> dict[str, Any]:
    """The section without the fields added later (name -> the value that means "as before") that still
    have that value: outputs made before a field existed stay valid until it is set."""
    return {k: v for k, v in section.items() if not (k in later and v in (later[k], None, [], {}))}


# --------------------------------------------------------------------------------------------------
# Shards of an Indexed Job: which shard a pod works on (the operator writes the list, the stage reads it)

SHARDS_ENV = "FUSIONRUN_SHARDS"  # the shards of one Indexed Job, in completion-index order
INDEX_ENV = "JOB_COMPLETION_INDEX"  # the pod's completion index (Kubernetes' downward API)


def format_indexes(numbers: Iterable[int]) -> str:
    """Sorted numbers in Kubernetes' completedIndexes format: runs of three or more as `first-last`
    ("1,3-5,7"). Used for the shard list of an Indexed Job as well (short for 1000 shards)."""
    nums = sorted(set(numbers))
    parts: list[str] = []
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        if j - i >= 2:
            parts.append(f"{nums[i]}-{nums[j]}")
        else:
            parts.extend(str(n) for n in nums[i : j + 1])
        i = j + 1
    return ",".join(parts)


def parse_indexes(text: str | None) -> list[int]:
    """The numbers of a completedIndexes / failedIndexes string ("1,3-5,7" -> [1, 3, 4, 5, 7]); ValueError
    for anything else."""
    out: list[int] = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        first, _, last = part.partition("-")
        lo, hi = int(first), int(last) if last else int(first)
        if hi < lo:
            raise ValueError(f"bad index range {part!r}")
        out.extend(range(lo, hi + 1))
    return out


def shard_at_index(environ: Mapping[str, str]) -> int:
    """The shard a pod of an Indexed Job works on: entry JOB_COMPLETION_INDEX of FUSIONRUN_SHARDS.
    ValueError naming the variable when either is missing or they do not fit together."""
    raw_index, raw_shards = environ.get(INDEX_ENV), environ.get(SHARDS_ENV)
    if raw_index is None or raw_shards is None:
        missing = [v for v, x in ((INDEX_ENV, raw_index), (SHARDS_ENV, raw_shards)) if x is None]
        raise ValueError(f"--shard-from-index needs {' and '.join(missing)} in the environment")
    try:
        index, shards = int(raw_index), parse_indexes(raw_shards)
    except ValueError:
        raise ValueError(f"{INDEX_ENV}={raw_index!r} / {SHARDS_ENV}={raw_shards!r}: not numbers") from None
    if not 0 <= index < len(shards):
        raise ValueError(f"{INDEX_ENV}={index} but {SHARDS_ENV} lists {len(shards)} shard(s)")
    return shards[index]
