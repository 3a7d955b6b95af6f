# FusionRun: every target sets itself up first (scripts/setup.sh is idempotent and fast when done).
PY := .venv/bin/python
EXAMPLE ?= examples/tiny-local.yaml
PYTEST_ARGS ?=

.PHONY: setup pins demo test test-slow test-all lint fmt crds bench ablation evidence-data evidence k8s images test-images test-cluster clean

setup:
	@bash scripts/setup.sh

## Move the exact pins (constraints.txt) forward: resolve pyproject.toml's ranges afresh, write, run the tests.
pins:
	bash scripts/update-pins.sh

## Build both images (operator, CPU job) with podman from the Dockerfile, on local Debian bases if needed.
images:
	bash scripts/images.sh build

## Run a tiny fusion end to end on this machine (no cluster, local artifacts).
demo: setup
	$(PY) -m jobs.cli run $(EXAMPLE)

## The default test run: lint + everything not marked slow, images or cluster (CI runs this, then the image and
## cluster suites: .ci/run).
test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	.venv/bin/lint-imports
	bash scripts/k8s-control-plane.sh build
	$(PY) -m pytest -m "not slow and not images and not cluster" $(PYTEST_ARGS)

## The images built from the Dockerfile (podman), run like stage pods: non-root, read-only root, no capabilities.
test-images: setup
	$(PY) -m pytest -m images $(PYTEST_ARGS)

## End to end on a one-node cluster with a real kubelet (containerd + runc): helm install, kubectl apply, faults.
test-cluster: setup
	bash scripts/k8s-cluster.sh build
	$(PY) -m pytest -m cluster $(PYTEST_ARGS)

## Slow suites: real pretrained models, longer multi-process training.
test-slow: setup
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

test-all: test test-slow

## The lint CI enforces: ruff check, ruff's formatter, the import layering (import-linter, pyproject.toml).
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	.venv/bin/lint-imports

fmt: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

## Regenerate crds/ (and the chart's copy) from the pydantic spec.
crds: setup
	$(PY) -m jobs.cli crd --write

bench: setup
	$(PY) -m bench.run

## Every benchmark at tiny sizes, checked, the heavy ones on tiny models (a few minutes; `make test` runs it:
## tests/test_bench_smoke.py). Fails when a benchmark crashes or its own checks fail, never on timings.
.PHONY: bench-smoke
bench-smoke: setup
	$(PY) -m bench.run --smoke

## The fusion ablation on real models (docs/results.md): the base evidence run, then its variants (hours on CPU).
ablation: setup
	bash scripts/fetch-real-models.sh
	$(PY) -m jobs.cli run examples/real-smollm2-gemma.yaml
	$(PY) -m bench.ablation $(VARIANTS)

## Texts of the source-knowledge evidence (docs/evidence-notes.md), built from pinned installed packages
## into examples/data/generated/ (not committed). The Debian texts need
## `apt-get install debian-faq developers-reference debian-reference-en`.
evidence-data: setup
	$(PY) examples/data/make_pkg_code_corpus.py
	$(PY) examples/data/make_debian_faq_text.py
	$(PY) examples/data/make_debian_docs.py
	$(PY) examples/tasks-pkg/make_pkg_tasks.py

## The evidence (docs/results.md): the headline run (FuseLLM and its baselines), its replicates and comparisons,
## each a real `fusionrun run` reusing the extraction through the shared cache (hours on 2 CPU cores).
evidence: evidence-data
	bash scripts/fetch-real-models.sh
	$(PY) -m jobs.cli run examples/evidence-pkg-code.yaml --until align
	$(PY) -m bench.source_value --spec examples/evidence-pkg-code.yaml
	$(PY) -m bench.evidence top-k-128 --until align
	for k in 10 32 64 128; do \
	  $(PY) -m bench.source_value --store examples/runs --run evidence-pkg-code-top-k-128 --top-k $$k || exit 1; done
	for knob in "--temperature 2" "--temperature 0.5" "--top-k 5" "--top-k 3" "--ce-unit token"; do \
	  $(PY) -m bench.source_value --spec examples/evidence-pkg-code.yaml $$knob || exit 1; done
	$(PY) -m bench.evidence $(RUNS)
	$(PY) -m bench.evidence --table docs/evidence-tables.md --plot docs/img/evidence.png

k8s:
	bash scripts/k8s-control-plane.sh build

clean:
	rm -rf .venv .pytest_cache .ruff_cache runs
