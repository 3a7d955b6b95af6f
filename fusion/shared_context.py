"""Multiple-choice scoring that reads each question once: lm-eval's HFLM, with the requests that share a
context scored from one pass over that context.

lm-eval scores a multiple-choice item as one request per choice, each `context + choice` run through the model
from the first token, so an item with four choices costs four passes over its context (lm-eval's own
one-token-continuation cache helps only when every choice is a single token). Here the context runs once,
its key/value cache is repeated for the choices, and only the choices' tokens run again: about
(L + 4C) tokens instead of 4(L + C) for a context of L tokens and choices of C. The log-probabilities are
those of the same model on the same tokens (tests/test_shared_context.py compares them with HFLM's).

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


@torch.inference_mode()
def score_group(
    model: Any, device: Any, context: list[int], continuations: list[list[int]]
) -> list[tuple[float, bool]]:
    """(sum of log-probabilities, whether every token is the greedy choice) of each continuation after
    `context`: the context runs once, its cache is repeated, the continuations run padded on the right (a
    padded position comes after every real one, so it changes none of them)."""
    out = model(input_ids=torch.tensor([context], device=device), use_cache=True)
    first = F.log_softmax(out.logits[0, -1].float(), dim=-1)  # predicts each continuation's first token
    longest = max(len(c) for c in continuations)
    rest = None
    if longest > 1:  # tokens 2.. of each continuation are predicted by the pass over tokens 1..n-1
        n = len(continuations)
        cache = out.cache  # transformers 5: `cache` (was past_key_values)
        cache.batch_repeat_interleave(n)
        inputs = torch.zeros((n, longest - 1), dtype=torch.long, device=device)
        for row, cont in enumerate(continuations):
            inputs[row, : len(cont) - 1] = torch.tensor(cont[:-1], device=device)
        mask = torch.ones((n, len(context) + longest - 1), dtype=torch.long, device=device)
        rest = F.log_softmax(model(input_ids=inputs, cache=cache, attention_mask=mask).logits.float(), dim=-1)
    results = []
    for row, cont in enumerate(continuations):
        logp = [first] + ([rest[row, j] for j in range(len(cont) - 1)] if rest is not None else [])
        target = torch.tensor(cont, device=device)
        dists = torch.stack(logp)  # [len(cont), vocab]
        total = float(dists.gather(1, target[:, None]).sum())
        greedy = bool((dists.argmax(dim=-1) == target).all())
        results.append((total, greedy))
    return results


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
        for group in groups:
            context = requests[group[0]][1]
            scored = score_group(self.model, self.device, context, [requests[i][2] for i in group])
            for i, answer in zip(group, scored, strict=True):
                answers[i] = answer
                self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return answers  # type: ignore[return-value]
