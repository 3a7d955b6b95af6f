"""The FuseLLM training loss without dense targets: lambda * CLM + (1 - lambda) * loss towards the fused q.

The fused distribution has at most K non-empty entries per position, so the loss needs only the model's
log-probabilities at those K ids: log p(v) = logit(v) - logsumexp(logits). The logsumexp over the
vocabulary is computed once, in fp32, and serves both the causal-LM term (gold id) and the fusion term
(the K target ids). Memory beyond the logits is O(B*T*K); no [B, T, V] target is ever built (the
reference's dense collator ran out of memory: defect 5).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

IGNORE_INDEX = -100
_LSE_CHUNK_ELEMENTS = 1 << 24  # fp32 working set of the chunked logsumexp: 64 MiB


class LossParts(NamedTuple):
    total: torch.Tensor
    clm: torch.Tensor
    fusion: torch.Tensor


class _LogSumExpFP32(torch.autograd.Function):
    """logsumexp over the last dim in fp32, in row chunks, saving only the logits (any dtype) and the result.

    torch.logsumexp(logits.float()) on bf16 logits would keep a full fp32 copy alive for backward; here the
    fp32 working set is one chunk at a time in both directions."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        flat = logits.reshape(-1, logits.shape[-1])
        rows = max(1, _LSE_CHUNK_ELEMENTS // max(1, flat.shape[1]))
        lse = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, flat.shape[0], rows):
            lse[start : start + rows] = torch.logsumexp(flat[start : start + rows].float(), dim=-1)
        ctx.save_for_backward(logits, lse)
        return lse.reshape(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_lse: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        logits, lse = ctx.saved_tensors
        flat = logits.reshape(-1, logits.shape[-1])
        g = grad_lse.reshape(-1).float()
        out = torch.empty_like(flat)
        rows = max(1, _LSE_CHUNK_ELEMENTS // max(1, flat.shape[1]))
        for start in range(0, flat.shape[0], rows):
            sl = slice(start, start + rows)
            # d lse / d logit = softmax(logits)
            out[sl] = (torch.exp(flat[sl].float() - lse[sl, None]) * g[sl, None]).to(out.dtype)
        return out.reshape(logits.shape)


def logsumexp_fp32(logits: torch.Tensor) -> torch.Tensor:
    """fp32 logsumexp over the vocabulary (last dim) of logits of any float dtype; differentiable."""
    return _LogSumExpFP32.apply(logits)


def fusion_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    target_ids: torch.Tensor,
    target_probs: torch.Tensor,
    fusion_mask: torch.Tensor,
    lam: float = 0.9,
    kind: str = "ce",
) -> LossParts:
    """lam * CLM + (1 - lam) * fusion loss, each averaged over its real positions.

    logits [B,T,V]; labels [B,T]: the next-token id at each position, -100 to ignore; target_ids [B,T,K]:
    the fused distribution's ids (-1 empty); target_probs [B,T,K]: their probabilities; fusion_mask [B,T]:
    positions that carry a fused target (rows whose ids are all empty are dropped as well).
    kind "ce": soft-label cross-entropy -sum q log p; "kl": KL(q || p) = CE - H(q), with 0 log 0 = 0.
    """
    if kind not in ("ce", "kl"):
        raise ValueError(f"fusion loss kind must be 'ce' or 'kl', got {kind!r}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    b, t = logits.shape[:2]
    if labels.shape != (b, t) or fusion_mask.shape != (b, t):
        raise ValueError(
            f"labels {tuple(labels.shape)} and fusion_mask {tuple(fusion_mask.shape)} must be "
            f"[B, T] = {(b, t)} to match logits"
        )
    if target_ids.shape[:2] != (b, t) or target_probs.shape != target_ids.shape:
        raise ValueError(
            f"target_ids {tuple(target_ids.shape)} and target_probs {tuple(target_probs.shape)} "
            f"must both be [B, T, K] with [B, T] = {(b, t)}"
        )

    lse = logsumexp_fp32(logits)  # [B,T] fp32, shared by both terms

    real = labels != IGNORE_INDEX
    gold = labels.clamp(min=0).unsqueeze(-1)
    gold_logp = logits.gather(-1, gold).squeeze(-1).float() - lse
    n_real = real.sum()
    clm = -(gold_logp * real).sum() / n_real.clamp(min=1)

    ids = target_ids.long()
    present = ids >= 0
    q = torch.where(present, target_probs.float(), 0.0)
    logp = logits.gather(-1, ids.clamp(min=0)).float() - lse.unsqueeze(-1)  # [B,T,K]
    ce_pos = -(q * torch.where(present, logp, 0.0)).sum(-1)
    if kind == "kl":
        q_log_q = torch.where(q > 0, q * torch.log(q.clamp(min=torch.finfo(torch.float32).tiny)), 0.0)
        ce_pos = ce_pos + q_log_q.sum(-1)
    use = fusion_mask.bool() & present.any(-1)
    fusion = (ce_pos * use).sum() / use.sum().clamp(min=1)

    if lam == 1.0:  # exactly the CLM loss (no 0 * fusion term that could carry a NaN)
        total = clm
    elif lam == 0.0:
        total = fusion
    else:
        total = lam * clm + (1.0 - lam) * fusion
    return LossParts(total, clm, fusion)
