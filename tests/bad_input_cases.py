"""The bad-input matrix (issue 15): FusionRun files a new, careless or hostile user writes, each with what
`fusionrun validate`, the API server (`kubectl apply`) and the operator must say about it.

A case's columns:
- validate: "ok", or a piece of `fusionrun validate`'s error (one line for a file it cannot read);
- server: "ok", or a piece of `kubectl apply --validate=false`'s error (the API server's schema, or
  kubectl's own YAML/JSON decoding, as every client without client-side validation meets it);
- operator: for a document the server stores, "ok" (the run is accepted: not Failed) or a piece of the
  InvalidSpec message the run fails with (and it starts no Job);
- client: a piece of the error of kubectl's own client-side validation (`kubectl apply`, the default),
  where it rejects what the server would take (misspelt fields);
- note: a warning validate prints for what kubectl does silently (a key written twice: the last counts;
  a byte that is not UTF-8: read as U+FFFD).
The rule every case obeys: validate says no exactly when the cluster says no (the server refuses the
document, or the operator fails the run).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import yaml

BASE_YAML = """\
apiVersion: fusionrun.dev/v1alpha1
kind: FusionRun
metadata:
  name: NAME
spec:
  target:
    name: tgt
    tokenizer: /models/tok
    randomInit: {hiddenSize: 16, numLayers: 1, numHeads: 2}
  sources:
    - name: src
      uri: /models/src
  corpus:
    uri: /data/corpus.txt
  extraction:
    maxLength: 64
  training:
    seqLen: 64
    maxSteps: 1
  store:
    uri: /runs
"""


@dataclass(frozen=True)
class Case:
    id: str
    text: str | bytes  # the file as written (NAME replaced by the case's run name)
    validate: str
    server: str
    operator: str | None = None
    client: str | None = None
    note: str | None = None  # a warning validate prints for what kubectl does silently

    def file_text(self, name: str) -> str | bytes:
        if isinstance(self.text, bytes):
            return self.text.replace(b"NAME", name.encode())
        return self.text.replace("NAME", name)

    @property
    def accepted(self) -> bool:
        """The cluster's verdict: stored by the server and run by the operator."""
        return self.server == "ok" and self.operator == "ok"


def base() -> dict[str, Any]:
    return yaml.safe_load(BASE_YAML)


def patched(path: str, value: Any) -> str:
    """BASE with one dotted path set ("spec.training.lamda"; list items by index); value DELETE removes it."""
    doc = base()
    node: Any = doc
    *parents, last = path.split(".")
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    if value is DELETE:
        del node[last]
    else:
        node[int(last) if isinstance(node, list) else last] = copy.deepcopy(value)
    return yaml.safe_dump(doc, sort_keys=False)


def text_replaced(old: str, new: str) -> str:
    assert old in BASE_YAML, old
    return BASE_YAML.replace(old, new)


DELETE = object()
TYPE_INT = "must be of type integer"

CASES: list[Case] = [
    # -- valid documents: everyone says yes ------------------------------------------------------------
    Case("valid", BASE_YAML, "ok", "ok", "ok"),
    Case(
        "float-exponent-without-dot",
        text_replaced("seqLen: 64", "seqLen: 64\n    learningRate: 1e-5"),
        "ok",
        "ok",
        "ok",
    ),
    Case("integral-float-for-integer", patched("spec.training.maxSteps", 5.0), "ok", "ok", "ok"),
    Case("largest-int64", patched("spec.training.seed", 2**63 - 1), "ok", "ok", "ok"),
    Case("null-section-is-absent", patched("spec.fusion", None), "ok", "ok", "ok"),
    Case("status-from-kubectl-get", BASE_YAML + "status:\n  phase: Running\n", "ok", "ok", "ok"),
    Case(
        "date-like-nonce-is-a-string",
        text_replaced("  store:", "  retry: {restartNonce: 2026-11-25}\n  store:"),
        "ok",
        "ok",
        "ok",
    ),
    Case(
        "base60-like-nonce-is-a-string",
        text_replaced("  store:", "  retry: {restartNonce: 1:30}\n  store:"),
        "ok",
        "ok",
        "ok",
    ),
    Case("y-means-true", text_replaced("  store:", "  suspend: y\n  store:"), "ok", "ok", "ok"),
    Case(
        "https-endpoint-and-region",
        patched(
            "spec.store",
            {"uri": "s3://bkt/runs", "endpoint": "https://minio.storage.svc:9000/s3", "region": "eu-west-1"},
        ),
        "ok",
        "ok",
        "ok",
    ),
    # -- misspelt fields: pruned by the server, named by validate and by the operator -----------------
    Case(
        "typo-suspended",
        patched("spec.suspended", True),
        "spec.suspended: unknown field; did you mean suspend?",
        "ok",
        "spec.suspended: unknown field; did you mean suspend?",
        'unknown field "suspended"',
    ),
    Case(
        "typo-lamda",
        patched("spec.training.lamda", 0.5),
        "spec.training.lamda: unknown field; did you mean lambda?",
        "ok",
        "spec.training.lamda: unknown field; did you mean lambda?",
        'unknown field "lamda"',
    ),
    Case(
        "typo-sources-url",
        patched("spec.sources.0.url", "/x"),
        "spec.sources.0.url: unknown field; did you mean uri?",
        "ok",
        "spec.sources.0.url: unknown field; did you mean uri?",
        'unknown field "url"',
    ),
    Case(
        "typo-credentialSecret",
        patched("spec.store.credentialSecret", {"name": "k"}),
        "spec.store.credentialSecret: unknown field; did you mean credentialsSecret?",
        "ok",
        "spec.store.credentialSecret: unknown field; did you mean credentialsSecret?",
        'unknown field "credentialSecret"',
    ),
    Case(
        "typo-inside-randomInit",
        patched("spec.target.randomInit.hiddensize", 32),
        "spec.target.randomInit.hiddensize: unknown field; did you mean hiddenSize?",
        "ok",
        "spec.target.randomInit.hiddensize: unknown field",
        'unknown field "hiddensize"',
    ),
    Case(
        "typo-inside-credentialsSecret",
        patched("spec.store.credentialsSecret", {"name": "k", "acessKeyKey": "K"}),
        "spec.store.credentialsSecret.acessKeyKey: unknown field; did you mean accessKeyKey?",
        "ok",
        "spec.store.credentialsSecret.acessKeyKey: unknown field",
        'unknown field "acessKeyKey"',
    ),
    Case(
        "typo-nodeselector",
        patched("spec.resources.train.nodeselector", {"gpu": "h100"}),
        "spec.resources.train.nodeselector: unknown field; did you mean nodeSelector?",
        "ok",
        "spec.resources.train.nodeselector: unknown field",
        'unknown field "nodeselector"',
    ),
    Case(
        "typo-in-eval-corpus",
        patched("spec.evaluation", {"corpora": [{"name": "code", "urii": "/c"}]}),
        "spec.evaluation.corpora.0.urii: unknown field",
        "spec.evaluation.corpora.uri: Required value",  # (1.20 names list items without their index)
    ),
    Case(
        "snake-case-learning_rate",
        patched("spec.training.learning_rate", 0.5),
        "spec.training.learning_rate: unknown field; did you mean learningRate?",
        "ok",
        "spec.training.learning_rate: unknown field; did you mean learningRate?",
        'unknown field "learning_rate"',
    ),
    Case(
        "snake-case-max_steps",
        patched("spec.training.max_steps", 3),
        "spec.training.max_steps: unknown field; did you mean maxSteps?",
        "ok",
        "spec.training.max_steps: unknown field",
    ),
    Case(
        "misplaced-top-level-suspend",
        BASE_YAML + "suspend: true\n",
        "suspend: unknown field",
        "ok",
        "suspend: unknown field",
    ),
    Case(
        "typo-metadata-lables",
        text_replaced("  name: NAME", "  name: NAME\n  lables: {team: a}"),
        "metadata.lables: unknown field; did you mean labels?",
        "ok",
        "metadata.lables: unknown field",
    ),
    # -- strings are not numbers or booleans; numbers Kubernetes cannot hold -----------------------------
    Case(
        "string-for-integer",
        patched("spec.training.maxSteps", "5"),
        "spec.training.maxSteps: Input should be a valid integer",
        "spec.training.maxSteps: Invalid value",
    ),
    Case(
        "string-for-boolean",
        patched("spec.suspend", "true"),
        "spec.suspend: Input should be a valid boolean",
        "spec.suspend: Invalid value",
    ),
    Case(
        "quoted-exponent-is-a-string",
        text_replaced("seqLen: 64", 'seqLen: 64\n    learningRate: "1e-5"'),
        "spec.training.learningRate: Input should be a valid number",
        "spec.training.learningRate: Invalid value",
    ),
    Case(
        "fraction-for-integer",
        patched("spec.training.maxSteps", 5.5),
        "spec.training.maxSteps: Input should be a valid integer",
        TYPE_INT,
    ),
    Case(
        "beyond-int64",
        patched("spec.training.seed", 2**63),
        "spec.training.seed: is beyond the 64-bit integer range",
        TYPE_INT,
    ),
    Case(
        "infinite-float",
        patched("spec.fusion.temperature", float("inf")),
        "spec.fusion.temperature: Input should be a finite number",
        "json: unsupported value: +Inf",
    ),
    Case(
        "integer-for-string",
        patched("spec.retry.restartNonce", 2),
        "spec.retry.restartNonce: Input should be a valid string",
        "spec.retry.restartNonce: Invalid value",
    ),
    Case(
        "integer-label-value",
        patched("spec.resources.train.nodeSelector", {"gpu": 1}),
        "spec.resources.train.nodeSelector.gpu: Input should be a valid string",
        "nodeSelector.gpu: Invalid value",
    ),
    Case(
        "boolean-for-integer",
        patched("spec.extraction.shards", True),
        "spec.extraction.shards: Input should be a valid integer",
        "spec.extraction.shards: Invalid value",
    ),
    # -- the document itself ----------------------------------------------------------------------------
    Case(
        "no-apiVersion",
        BASE_YAML.replace("apiVersion: fusionrun.dev/v1alpha1\n", ""),
        "apiVersion: Field required",
        'no matches for kind "FusionRun" in version ""',  # kubectl cannot even find the resource
    ),
    Case(
        "no-metadata-name",
        text_replaced("  name: NAME", "  labels: {team: a}"),
        "metadata.name: Field required",
        "name",
    ),
    Case(
        "key-written-twice",
        text_replaced("    maxSteps: 1", "    maxSteps: 1\n    maxSteps: 2"),
        "ok",  # kubectl takes the last value: so does validate, and says so
        "ok",
        "ok",
        note="key 'maxSteps' is written twice (first on line 19); the last value counts",
    ),
    Case(
        "not-utf8",
        BASE_YAML.encode().replace(b"/data/corpus.txt", b"/data/corpus-\xff.txt"),
        "ok",  # kubectl reads the byte as U+FFFD: so does validate, and says so
        "ok",
        "ok",
        note="line 14: byte 0xff is not UTF-8; read as U+FFFD, as kubectl does",
    ),
    # -- store URIs and endpoints -----------------------------------------------------------------------
    Case(
        "store-s3-no-bucket",
        patched("spec.store.uri", "s3://"),
        "spec.store.uri: String should match pattern",
        "spec.store.uri: Invalid value",
    ),
    Case(
        "store-s3-empty-bucket",
        patched("spec.store.uri", "s3:///runs"),
        "spec.store.uri: String should match pattern",
        "spec.store.uri: Invalid value",
    ),
    Case(
        "endpoint-with-space",
        patched("spec.store.endpoint", "http://minio 9000"),
        "spec.store.endpoint: String should match pattern",
        "spec.store.endpoint: Invalid value",
    ),
    Case(
        "endpoint-without-scheme",
        patched("spec.store.endpoint", "minio:9000"),
        "spec.store.endpoint: String should match pattern",
        "spec.store.endpoint: Invalid value",
    ),
    Case(
        "endpoint-with-password",
        patched("spec.store.endpoint", "https://key:secret@minio:9000"),
        "spec.store.endpoint: String should match pattern",
        "spec.store.endpoint: Invalid value",
    ),
    Case(
        "region-with-spaces",
        patched("spec.store.region", "us east 1"),
        "spec.store.region: String should match pattern",
        "spec.store.region: Invalid value",
    ),
    Case(
        "model-uri-s3-no-bucket",
        patched("spec.sources.0.uri", "s3://"),
        "spec.sources.0.uri: String should match pattern",
        "spec.sources.uri: Invalid value",
    ),
    Case(
        "secret-name-not-dns",
        patched("spec.store.credentialsSecret", {"name": "S3_Keys"}),
        "spec.store.credentialsSecret.name: String should match pattern",
        "credentialsSecret.name: Invalid value",
    ),
    Case(
        "plain-http-without-insecure",
        patched("spec.store.endpoint", "http://minio:9000"),
        "endpoint is plain http://: set insecure: true",
        "ok",
        "endpoint is plain http://: set insecure: true",
    ),
    # -- what was handled before (pinned) -----------------------------------------------------------------
    Case(
        "topK-zero",
        patched("spec.extraction.topK", 0),
        "spec.extraction.topK: Input should be greater than or equal to 1",
        "spec.extraction.topK: Invalid value: 0",
    ),
    Case(
        "strategy-enum",
        patched("spec.fusion.strategy", "maxCE"),
        "spec.fusion.strategy: Input should be 'minCE' or 'avgCE'",
        'spec.fusion.strategy: Unsupported value: "maxCE"',
    ),
    Case(
        "corpus-missing",
        patched("spec.corpus", DELETE),
        "spec.corpus: Field required",
        "spec.corpus: Required value",
    ),
    Case(
        "no-sources",
        patched("spec.sources", []),
        "spec.sources: List should have at least 1 item",
        "spec.sources: Invalid value",
    ),
    Case(
        "model-name-pattern",
        patched("spec.target.name", "Bad_Name"),
        "spec.target.name: String should match pattern",
        "spec.target.name: Invalid value",
    ),
    Case(
        "duplicate-model-names",
        patched("spec.sources.0.name", "tgt"),
        "model names must be unique",
        "ok",
        "model names must be unique",
    ),
    Case(
        "seqLen-over-maxLength",
        patched("spec.training.seqLen", 128),
        "training.seqLen (128) exceeds extraction.maxLength (64)",
        "ok",
        "training.seqLen (128) exceeds extraction.maxLength (64)",
    ),
    Case(
        "heads-do-not-divide",
        patched("spec.target.randomInit.numHeads", 3),
        "hiddenSize (16) must be a multiple of numHeads (3)",
        "ok",
        "hiddenSize (16) must be a multiple of numHeads (3)",
    ),
]

# A few of every kind, for the default (not slow) suite on the real API server.
FAST_IDS = (
    "valid",
    "float-exponent-without-dot",
    "typo-suspended",
    "typo-inside-credentialsSecret",
    "snake-case-learning_rate",
    "string-for-integer",
    "beyond-int64",
    "store-s3-no-bucket",
    "duplicate-model-names",
)


def case(case_id: str) -> Case:
    return next(c for c in CASES if c.id == case_id)
