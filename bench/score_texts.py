"""Bits per byte of real models on texts, before any run: which domain has a source that is clearly better
than the target (a corpus where fusion has something to transfer)?

    .venv/bin/python -m bench.score_texts examples/data/generated/pkg-code.jsonl examples/data/stdlib-code.txt
    .venv/bin/python -m bench.score_texts --group origin /tmp/probe.jsonl     # per package (JSONL "origin")

Models default to the real-model pair of examples/real-smollm2-gemma.yaml (each with its own BOS
convention, as extraction and evaluate use them). Texts: a .jsonl file (field "text") or a text file (one
document per blank-line-separated paragraph), as a FusionRun reads them. With --group, a JSONL field
whose value up to the first "/" groups the documents (e.g. the package of make_pkg_code_corpus's
"origin"), and each group gets its own figure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "smollm2": ROOT / ".cache/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma3": ROOT / ".cache/models/gemma3-270m/gemma-3-270m-q4_k_m.gguf",
}


def read_texts(path: Path, group_field: str | None) -> tuple[list[str], list[str]]:
    """Documents and their group labels ("all" without a group field)."""
    from jobs.corpus import split_paragraphs

    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        groups = [str(r.get(group_field, "")).split("/")[0] if group_field else "all" for r in rows]
        return [r["text"] for r in rows], groups
    docs = split_paragraphs(path.read_text(encoding="utf-8"))
    return docs, ["all"] * len(docs)


def score_model(gguf: Path, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per document: bits (nll / ln 2) and predicted bytes under one model."""
    from fusion.evaluate import score_documents
    from fusion.hub import load_tokenizer
    from fusion.models import load_model
    from fusion.tokens import TokenizerView, adds_bos_by_default, encode_documents

    tok = load_tokenizer(str(gguf.parent), gguf.name)
    view = TokenizerView.from_tokenizer(tok)
    model = load_model(str(gguf.parent), gguf.name, vocab_size=view.vocab_size, eos_token_id=view.eos_id)
    docs = encode_documents(tok, texts, add_bos=adds_bos_by_default(tok))
    s = score_documents(model, view, docs, batch_tokens=4096)
    return s.nll / math.log(2), s.pred_nbytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("texts", nargs="+", type=Path)
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--group", help="JSONL field whose value (up to the first '/') groups documents")
    ap.add_argument("--json", type=Path, help="also write per-document bits here")
    args = ap.parse_args(argv)
    from fusion.evaluate import paired_bpb_difference

    sets = {p.name: read_texts(p, args.group) for p in args.texts}
    bits: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for m in args.models:
        bits[m] = {name: score_model(MODELS[m], texts) for name, (texts, _) in sets.items()}
        print(f"scored {m}", file=sys.stderr, flush=True)
    print(f"| text | group | documents | bytes | {' | '.join(args.models)} | first minus second [95% CI] |")
    print("|---|---|---|---|" + "---|" * len(args.models) + "---|")
    for name, (_, groups) in sets.items():
        labels = np.array(groups)
        for g in [*sorted(set(groups)), *(["all"] if len(set(groups)) > 1 else [])]:
            sel = np.ones(len(labels), bool) if g == "all" else labels == g
            nbytes = {m: bits[m][name][1][sel] for m in args.models}
            bpb = [bits[m][name][0][sel].sum() / nbytes[m].sum() for m in args.models]
            diff = "-"
            if len(args.models) == 2 and sel.sum() > 1:
                a, b = (bits[m][name][0][sel] for m in args.models)
                d = paired_bpb_difference(a, b, nbytes[args.models[0]])
                diff = f"{d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]"
            cells = " | ".join(f"{x:.4f}" for x in bpb)
            print(
                f"| {name} | {g} | {int(sel.sum())} | {int(nbytes[args.models[0]].sum())} | "
                f"{cells} | {diff} |"
            )
    if args.json:
        out = {
            m: {n: {"doc_bits": b.tolist(), "doc_bytes": y.tolist()} for n, (b, y) in v.items()}
            for m, v in bits.items()
        }
        args.json.write_text(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
