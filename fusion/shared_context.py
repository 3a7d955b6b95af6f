"""Multiple-choice scoring that reads each question once: lm-eval's HFLM, with the requests that share a
context scored from one pass over that context.

lm-eval scores a multiple-choice item as one request per choice, each `context + choice` run through the model
from the first token, so an item with four choices costs four passes over its context (lm-eval's own
one-token-continuation cache helps only when every choice is a single token). Here the context runs once,
its key/value cache is repeated for the choices, and only the choices' tokens run again: about
(L + 4C) tokens instead of 4(L + C) for a context of L tokens and choices of C. Several items run in one
batch (contexts padded on the left, within the token budget HFLM's batch would have: batch size x length).
The log-probabilities are those of the same model on the same tokens (tests/test_shared_context.py compares
them with HFLM's).

Requests that would be truncated (context + continuation longer than the model's length), that have no
context tokens, or whose context no other request shares go through HFLM's own path unchanged.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM

Request = tuple[tuple[str, str], list[int], list[int]]  # ((context, continuation), their token ids)


def context_groups(requests: list[Request], max_length: int) -> tuple[list[list[int]], list[int]]:
    """Indices of `requests` grouped by identical context tokens (groups of two or more, in first-seen
    order), and the indices left to HFLM's own path (single, empty-context or over-long requests)."""
    by_context: dict[tuple[int, ...], list[int]] = defaultdict(list)
    alone = []
    for i, (_, ctx, cont) in enumerate(requests):
        if ctx and cont and len(ctx) + len(cont) <= max_length:
            by_context[tuple(ctx)].append(i)
        else:
            alone.append(i)
    groups = [g for g in by_context.values() if len(g) > 1]
    alone += [g[0] for g in by_context.values() if len(g) == 1]
    return groups, sorted(alone)


def batches(groups: list[list[int]], requests: list[Request], token_budget: int) -> list[list[list[int]]]:
    """Groups in batches, longest context first, each within `token_budget` tokens as run: the contexts
    padded to the batch's longest, then every continuation (but its last token) padded to the longest."""
    order = sorted(groups, key=lambda g: -len(requests[g[0]][1]))
    out: list[list[list[int]]] = []
    batch: list[list[int]] = []
    longest_ctx = longest_cont = rows = 0
    for group in order:
        ctx = max(longest_ctx, len(requests[group[0]][1]))
        cont = max(longest_cont, *(len(requests[i][2]) - 1 for i in group))
        cost = (len(batch) + 1) * ctx + (rows + len(group)) * cont
        if batch and cost > token_budget:
            out.append(batch)
            batch, ctx, rows = [], len(requests[group[0]][1]), 0
            cont = max(len(requests[i][2]) - 1 for i in group)
        batch.append(group)
        longest_ctx, longest_cont, rows = ctx, cont, rows + len(group)
    return out + ([batch] if batch else [])


@torch.inference_mode()
def score_batch(
    model: Any, device: Any, contexts: list[list[int]], continuations: list[list[list[int]]]
) -> list[list[tuple[float, bool]]]:
    """(sum of log-probabilities, whether every token is the greedy choice) of each continuation after its
    context. The contexts run once, padded on the left (positions count real tokens only, as generation
    does); their cache is repeated for each continuation, which runs padded on the right (a padded position
    comes after every real one, so it changes none of them)."""
    longest = max(len(c) for c in contexts)
    ids = torch.zeros((len(contexts), longest), dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for b, ctx in enumerate(contexts):
        ids[b, longest - len(ctx) :] = torch.tensor(ctx, device=device)
        mask[b, longest - len(ctx) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # Only the last position's logits are needed from the contexts (the output layer is a fifth of the model).
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    first = F.log_softmax(out.logits[:, -1].float(), dim=-1)  # [contexts, vocab]: each first token
    owner = [b for b, conts in enumerate(continuations) for _ in conts]
    flat = [c for conts in continuations for c in conts]
    rest = _continue(model, device, out.cache, mask, owner, flat)  # [continuations, longest - 1, vocab]
    scored: list[tuple[float, bool]] = []
    for row, (b, cont) in enumerate(zip(owner, flat, strict=True)):
        dists = (
            torch.cat([first[b : b + 1], rest[row, : len(cont) - 1]])
            if rest is not None
            else first[b : b + 1]
        )
        target = torch.tensor(cont, device=device)
        scored.append(
            (float(dists.gather(1, target[:, None]).sum()), bool((dists.argmax(-1) == target).all()))
        )
    it = iter(scored)
    return [[next(it) for _ in conts] for conts in continuations]


def _continue(
    model: Any, device: Any, cache: Any, mask: torch.Tensor, owner: list[int], flat: list[list[int]]
) -> torch.Tensor | None:
    """Log-probabilities after tokens 1..n-1 of each continuation, from its context's cache (None when every
    continuation is one token)."""
    longest = max(len(c) for c in flat)
    if longest == 1:
        return None
    rows = torch.tensor(owner, device=device)
    cache.batch_select_indices(rows)  # one copy of its context's cache per continuation
    inputs = torch.zeros((len(flat), longest - 1), dtype=torch.long, device=device)
    for row, cont in enumerate(flat):
        inputs[row, : len(cont) - 1] = torch.tensor(cont[:-1], device=device)
    ctx_mask = mask[rows]
    full = torch.cat([ctx_mask, torch.ones_like(inputs)], dim=1)
    positions = ctx_mask.sum(-1, keepdim=True) + torch.arange(longest - 1, device=device)
    logits = model(input_ids=inputs, attention_mask=full, position_ids=positions, cache=cache).logits
    return F.log_softmax(logits.float(), dim=-1)


class SharedContextLM(HFLM):
    """HFLM whose log-likelihood requests that share a context are scored from one pass over it."""

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[tuple[float, bool]]:
        groups, alone = context_groups(requests, self.max_length)
        answers: list[tuple[float, bool] | None] = [None] * len(requests)
        if alone:
            scored = super()._loglikelihood_tokens([requests[i] for i in alone], disable_tqdm, override_bs)
            for i, answer in zip(alone, scored, strict=True):
                answers[i] = answer
        budget = (self.batch_size if isinstance(self.batch_size, int) else 4) * self.max_length
        for batch in batches(groups, requests, budget):
            contexts = [requests[g[0]][1] for g in batch]
            conts = [[requests[i][2] for i in g] for g in batch]
            for group, scored in zip(
                batch, score_batch(self.model, self.device, contexts, conts), strict=True
            ):
                for i, answer in zip(group, scored, strict=True):
                    answers[i] = answer
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return answers  # type: ignore[return-value]
