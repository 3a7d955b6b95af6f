"""Extraction (FuseLLM step 2): each model's top-k next-token log-probabilities over its own tokenization.

Documents are run one per sequence (no packing: a packed neighbour would leak context into the
predictions), LENGTH-BUCKETED: sorted by length and grouped into batches of at most `batch_tokens` padded
tokens, each padded only to its own longest document (right padding + attention mask). The base model
runs to hidden states for the whole batch; the LM head then runs over the real positions only, a chunk of
positions at a time, so [positions, vocab] logits never exist for a whole batch of a big vocabulary.
log_softmax is taken in fp32 over the full vocabulary, then gold log-prob and top-k.

Row t of a document holds the distribution of token t+1 (design.md). The last row of each document
predicts nothing: its gold_logprob is 0 and it counts in no CE; its top-k entries are still the model's
prediction after the document (harmless, and they keep rows uniform).

When config.vocab_size exceeds len(tokenizer) (padded vocabularies, e.g. Qwen), the softmax stays the
model's full one, but top-k only picks ids < len(tokenizer): padding rows stand for no text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from fusion.format import id_dtype

_HEAD_CHUNK_ELEMENTS = 1 << 24  # fp32 logits per LM-head chunk (64 MiB): positions = this // vocab


class TokenView(Protocol):
    """What extraction needs of a tokenizer (fusion.tokens.TokenizerView provides it)."""

    vocab_size: int
    nbytes: np.ndarray


class ExtractionError(ValueError):
    """Input that extraction cannot use; the message names the document or setting and the fix."""


def plan_batches(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Length-bucketed batches: document indices, longest first, each batch's rows x its own max length
    at most `batch_tokens` (a single document longer than that is a batch of its own)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")  # stable: equal lengths keep document order (determinism)
    batches: list[np.ndarray] = []
    start = 0
    n = len(order)
    while start < n:
        longest = int(lengths[order[start]])  # sorted descending: the first row is the batch's max
        rows = max(1, batch_tokens // max(1, longest))
        batches.append(order[start : start + rows])
        start += rows
    return batches


@dataclass
class _Flat:
    """Documents concatenated: ids, each row's next id, whether a row predicts a token, doc offsets."""

    ids: np.ndarray
    next_ids: np.ndarray
    predicts: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray


def _flatten(docs: list[np.ndarray], vocab_size: int, what: str) -> _Flat:
    if not docs:
        raise ExtractionError(f"{what}: no documents given; a shard needs at least one document")
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    empty = np.flatnonzero(lengths == 0)
    if len(empty):
        raise ExtractionError(
            f"{what}: documents {empty[:10].tolist()} are empty (0 tokens); every document must hold at "
            "least its EOS token: encode with fusion.tokens.encode_documents (it appends EOS) and drop "
            "empty texts"
        )
    ids = np.concatenate([np.asarray(d) for d in docs]).astype(np.int64, copy=False)
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if len(bad):
        raise ExtractionError(
            f"{what}: token id {int(ids[bad[0]])} is outside the tokenizer's vocabulary [0, {vocab_size}); "
            "the documents were encoded with a different tokenizer than this model's"
        )
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    next_ids = np.zeros_like(ids)
    next_ids[:-1] = ids[1:]
    predicts = np.ones(len(ids), dtype=bool)
    predicts[offsets[1:] - 1] = False  # the last row of each document
    next_ids[~predicts] = 0
    return _Flat(ids, next_ids, predicts, offsets, lengths)


def _batch_rows(flat: _Flat, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat row indices of a batch's documents (in batch order) and their (row, column) in the batch."""
    lens = flat.lengths[batch]
    row = np.repeat(np.arange(len(batch)), lens)
    starts = np.repeat(flat.offsets[batch], lens)
    col = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
    return starts + col, row, col


def _lm_head_parts(model: Any) -> tuple[torch.nn.Module, torch.nn.Module, float | None]:
    base = model.base_model
    head = model.get_output_embeddings()
    if base is None or base is model or head is None:
        raise ExtractionError(f"{type(model).__name__} is not a causal LM with a base model and an LM head")
    return base, head, getattr(model.config, "final_logit_softcapping", None)


def _device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


def _autocast(device: torch.device, model: Any) -> Any:
    """bf16 autocast on CUDA for fp32 models (the reference extracts in bf16); a no-op context elsewhere."""
    fp32 = next(model.parameters()).dtype == torch.float32
    use = device.type == "cuda" and fp32 and torch.cuda.is_bf16_supported()
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=use)


def _head_logits(head: torch.nn.Module, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def forward_logprobs(
    model: Any,
    docs: list[np.ndarray],
    vocab_size: int,
    top_k: int = 0,
    batch_tokens: int = 8192,
    progress: Callable[[int], None] | None = None,
    what: str = "extraction",
    check_head: bool = True,
) -> dict[str, np.ndarray]:
    """The shared forward of extraction and evaluation, over documents of token ids.

    Returns flat per-row arrays in document order: gold_logprob float32 [N] (0 on last rows), and with
    top_k > 0 topk_ids int64 [N, k] / topk_logprobs float32 [N, k]; plus offsets int64 [D+1].
    check_head: first verify on a few tokens that the split forward reproduces the model's own logits."""
    flat, model_vocab = _checked_inputs(model, docs, vocab_size, top_k, batch_tokens, what)
    if check_head:
        check_head_matches_forward(model, np.asarray(docs[0]))
    n = len(flat.ids)
    gold = np.zeros(n, dtype=np.float32)
    out: dict[str, np.ndarray] = {"gold_logprob": gold, "offsets": flat.offsets}
    if top_k:
        out["topk_ids"] = np.zeros((n, top_k), dtype=np.int64)
        out["topk_logprobs"] = np.zeros((n, top_k), dtype=np.float32)

    base, head, softcap = _lm_head_parts(model)
    device = _device_of(model)
    chunk = max(1, _HEAD_CHUNK_ELEMENTS // model_vocab)
    ids_t = torch.from_numpy(flat.ids)
    next_t = torch.from_numpy(flat.next_ids)
    with torch.inference_mode(), _autocast(device, model):
        for batch in plan_batches(flat.lengths, batch_tokens):
            rows, r, c = _batch_rows(flat, batch)
            width = int(flat.lengths[batch].max())
            input_ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            rows_t, r_t, c_t = (torch.from_numpy(a) for a in (rows, r, c))
            input_ids[r_t, c_t] = ids_t[rows_t]
            mask[r_t, c_t] = 1
            hidden = base(input_ids=input_ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            # Row-major boolean selection = documents in batch order, positions in order: matches `rows`.
            real = hidden[mask.to(device).bool()]
            targets = next_t[rows_t].to(device)
            for s in range(0, len(rows), chunk):
                # fp32 log_softmax over the full vocabulary (faster than logsumexp + subtract on CPU).
                logp = torch.log_softmax(_head_logits(head, real[s : s + chunk], softcap), dim=-1)
                sel = rows[s : s + chunk]
                gold[sel] = logp.gather(-1, targets[s : s + chunk, None]).squeeze(-1).cpu().numpy()
                if top_k:
                    # Padded vocabulary rows (ids >= len(tokenizer)) stand for no text: never pick them.
                    vals, idx = torch.topk(logp[:, :vocab_size], top_k, dim=-1)
                    out["topk_ids"][sel] = idx.cpu().numpy()
                    out["topk_logprobs"][sel] = vals.cpu().numpy()
                del logp
            if progress is not None:
                progress(len(rows))
    gold[~flat.predicts] = 0.0
    out["predicts"] = flat.predicts
    out["input_ids"] = flat.ids
    return out


def _checked_inputs(
    model: Any, docs: list[np.ndarray], vocab_size: int, top_k: int, batch_tokens: int, what: str
) -> tuple[_Flat, int]:
    """The documents flattened (_flatten) and the model's output rows, once the tokenizer, top_k,
    batch_tokens and the documents' lengths are known to fit the model; ExtractionError naming the fix."""
    head_weight = getattr(model.get_output_embeddings(), "weight", None)
    # The LM head's rows are the logits (config.vocab_size can be absent or nested in composite configs).
    model_vocab = int(head_weight.shape[0]) if head_weight is not None else int(model.config.vocab_size)
    if vocab_size > model_vocab:
        raise ExtractionError(
            f"{what}: tokenizer has {vocab_size} tokens but the model only {model_vocab} output rows: "
            "pair the model with its own tokenizer"
        )
    if top_k > vocab_size:
        raise ExtractionError(
            f"{what}: top_k={top_k} exceeds the vocabulary size {vocab_size}; "
            f"set extraction.topK to at most {vocab_size}"
        )
    if batch_tokens < 1:
        raise ExtractionError(f"{what}: batch_tokens must be positive, got {batch_tokens}")
    flat = _flatten(docs, vocab_size, what)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and int(flat.lengths.max()) > max_pos:
        longest = int(np.argmax(flat.lengths))
        raise ExtractionError(
            f"{what}: document {longest} has {int(flat.lengths[longest])} tokens, more than the model's "
            f"max_position_embeddings ({max_pos}); lower extraction.maxLength so prepare splits documents"
        )
    return flat, model_vocab


def check_head_matches_forward(model: Any, ids: np.ndarray, atol: float = 1e-3) -> None:
    """Guard: the split forward (base model + LM head + softcap) must give the model's own logits.

    Architectures that transform logits in ways this module does not reproduce (a logit scale, say) would
    otherwise yield silently wrong distributions; checked once per extraction on a few tokens."""
    base, head, softcap = _lm_head_parts(model)
    device = _device_of(model)
    x = torch.as_tensor(np.asarray(ids[:16], dtype=np.int64))[None].to(device)
    with torch.inference_mode(), _autocast(device, model):
        ours = _head_logits(head, base(input_ids=x).last_hidden_state, softcap)
        theirs = model(input_ids=x).logits.float()
    scale = float(theirs.abs().max()) + 1.0
    if not torch.allclose(ours, theirs, atol=atol * scale, rtol=0):
        raise ExtractionError(
            f"{type(model).__name__}: base model + LM head do not reproduce the model's logits (max diff "
            f"{float((ours - theirs).abs().max()):.3g}); this architecture transforms logits in a way "
            "fusion.extract does not support yet"
        )


def extract_documents(
    model: Any,
    view: TokenView,
    docs: list[np.ndarray],
    doc_index: np.ndarray,
    top_k: int = 10,
    batch_tokens: int = 8192,
    progress: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """The arrays of an EXTRACT shard (fusion.format) for `docs` (token ids, EOS included, no BOS)."""
    doc_index = np.asarray(doc_index, dtype=np.int64)
    if doc_index.shape != (len(docs),):
        raise ExtractionError(
            f"doc_index has shape {doc_index.shape}, expected ({len(docs)},): one id per document"
        )
    if top_k < 1:
        raise ExtractionError(f"top_k must be at least 1, got {top_k}")
    vocab = int(view.vocab_size)
    if top_k > vocab:  # checked here too so the error comes before any forward
        raise ExtractionError(
            f"top_k={top_k} exceeds the vocabulary size {vocab}; set extraction.topK to at most {vocab}"
        )
    res = forward_logprobs(model, docs, vocab, top_k, batch_tokens, progress, "extraction")
    offsets, predicts = res["offsets"], res["predicts"]
    ids = res["input_ids"]
    gold = res["gold_logprob"]
    nbytes = np.asarray(view.nbytes, dtype=np.uint16)
    token_nbytes = nbytes[ids]
    # Per document, in fp32/fp64 before any 16-bit rounding: -sum log p(gold), predicted tokens and bytes.
    starts = offsets[:-1]
    doc_nll = -np.add.reduceat(gold.astype(np.float64), starts)
    pred_bytes = np.where(predicts, np.append(token_nbytes[1:], 0), 0).astype(np.int64)
    doc_pred_nbytes = np.add.reduceat(pred_bytes, starts)
    doc_n_pred = (np.diff(offsets) - 1).astype(np.int32)
    idt = id_dtype(vocab)
    return {
        "doc_index": doc_index,
        "doc_offsets": offsets,
        "input_ids": ids.astype(idt),
        "token_nbytes": token_nbytes,
        "topk_ids": res["topk_ids"].astype(idt),
        "topk_logprobs": res["topk_logprobs"].astype(np.float16),
        "gold_logprob": gold.astype(np.float16),
        "doc_nll": doc_nll.astype(np.float32),
        "doc_pred_nbytes": doc_pred_nbytes,
        "doc_n_pred": doc_n_pred,
    }
