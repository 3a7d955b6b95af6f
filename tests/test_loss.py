"""fusion.loss: the sparse fusion loss equals the dense formulation (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fusion.loss import _lse_fp32, fusion_loss


def _case(seed: int = 0, b: int = 2, t: int = 5, v: int = 11, k: int = 4):
    """Random logits and a sparse fused target with empty entries, ignored labels and masked positions."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64).float() * 3
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, -1] = -100
    labels[1, 2] = -100
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(b * t)]).reshape(b, t, k)
    probs = torch.rand(b, t, k, generator=g)
    ids[0, 1, 2:] = -1  # a row with two empty entries
    ids[1, 3, 1:] = -1  # a one-hot row
    probs = torch.where(ids >= 0, probs, 0.0)
    probs = probs / probs.sum(-1, keepdim=True)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, -1] = False
    mask[1, 0] = False
    return logits, labels, ids, probs, mask


def _dense_target(ids: torch.Tensor, probs: torch.Tensor, v: int) -> torch.Tensor:
    dense = torch.zeros(*ids.shape[:2], v, dtype=torch.float32)
    dense.scatter_add_(-1, ids.clamp(min=0).long(), torch.where(ids >= 0, probs, 0.0))
    return dense


def _dense_reference(logits, labels, ids, probs, mask, lam, kind):
    v = logits.shape[-1]
    clm = F.cross_entropy(logits.reshape(-1, v), labels.reshape(-1), ignore_index=-100)
    q = _dense_target(ids, probs, v)
    logp = F.log_softmax(logits.float(), dim=-1)
    if kind == "ce":
        per_pos = F.cross_entropy(logits.reshape(-1, v), q.reshape(-1, v), reduction="none")
        per_pos = per_pos.reshape(mask.shape)
    else:
        per_pos = F.kl_div(logp, q, reduction="none").sum(-1)
    fusion = per_pos[mask].mean()
    return lam * clm + (1 - lam) * fusion, clm, fusion


@pytest.mark.parametrize("kind", ["ce", "kl"])
@pytest.mark.parametrize("lam", [0.9, 0.3, 0.0])
def test_equals_dense_reference_values_and_gradients(kind: str, lam: float) -> None:
    logits, labels, ids, probs, mask = _case()
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    got = fusion_loss(a, labels, ids, probs, mask, lam=lam, kind=kind)
    want = _dense_reference(b, labels, ids, probs, mask, lam, kind)
    for g, w in zip(got, want, strict=True):
        assert g.item() == pytest.approx(w.item(), abs=1e-5)
    got.total.backward()
    want[0].backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)


def test_hand_computed_single_position() -> None:
    # V=3, logits (0, ln 2, ln 3) -> p = (1/6, 2/6, 3/6); gold = 2; q = 0.5 on id 1, 0.5 on id 2.
    logits = torch.tensor([[[0.0, math.log(2), math.log(3)]]])
    labels = torch.tensor([[2]])
    ids = torch.tensor([[[1, 2, -1]]])
    probs = torch.tensor([[[0.5, 0.5, 0.0]]])
    mask = torch.tensor([[True]])
    ce = fusion_loss(logits, labels, ids, probs, mask, lam=0.9, kind="ce")
    clm = -math.log(3 / 6)
    fus = -(0.5 * math.log(2 / 6) + 0.5 * math.log(3 / 6))
    assert ce.clm.item() == pytest.approx(clm, abs=1e-6)
    assert ce.fusion.item() == pytest.approx(fus, abs=1e-6)
    assert ce.total.item() == pytest.approx(0.9 * clm + 0.1 * fus, abs=1e-6)
    kl = fusion_loss(logits, labels, ids, probs, mask, lam=0.9, kind="kl")
    assert kl.fusion.item() == pytest.approx(fus + 2 * 0.5 * math.log(0.5), abs=1e-6)  # CE - H(q)


def test_lambda_one_is_exactly_the_clm_loss() -> None:
    logits, labels, ids, probs, mask = _case(seed=3)
    v = logits.shape[-1]
    parts = fusion_loss(logits, labels, ids, probs, mask, lam=1.0)
    assert torch.equal(parts.total, parts.clm)
    ref = F.cross_entropy(logits.reshape(-1, v), labels.reshape(-1), ignore_index=-100)
    assert parts.total.item() == pytest.approx(ref.item(), abs=1e-6)


def test_empty_ids_and_masked_positions_are_ignored() -> None:
    logits, labels, ids, probs, mask = _case(seed=5)
    base = fusion_loss(logits, labels, ids, probs, mask).fusion
    # Garbage probabilities under empty ids change nothing.
    junk = torch.where(ids >= 0, probs, torch.full_like(probs, 7.0))
    assert fusion_loss(logits, labels, ids, junk, mask).fusion.item() == pytest.approx(base.item(), abs=1e-7)
    # Changing the target at a masked-out position changes nothing; at a masked-in one it does.
    ids2 = ids.clone()
    ids2[0, -1] = torch.tensor([0, 1, 2, 3])
    same = fusion_loss(logits, labels, ids2, probs, mask).fusion.item()
    assert same == pytest.approx(base.item(), abs=1e-7)
    ids2[0, 0] = torch.tensor([0, 1, 2, 3])
    changed = fusion_loss(logits, labels, ids2, probs, mask).fusion.item()
    assert changed != pytest.approx(base.item(), abs=1e-4)
    # A masked-in row with every id empty is no real position: it does not dilute the average.
    ids3 = ids.clone()
    ids3[1, 4] = -1
    mask3 = mask.clone()
    keep = mask3.clone()
    keep[1, 4] = False
    assert fusion_loss(logits, labels, ids3, probs, mask3).fusion.item() == pytest.approx(
        fusion_loss(logits, labels, ids, probs, keep).fusion.item(), abs=1e-6
    )


def test_bf16_autocast_close_to_fp32() -> None:
    logits, labels, ids, probs, mask = _case(seed=7, b=2, t=8, v=300, k=6)
    ref = fusion_loss(logits, labels, ids, probs, mask)
    x = logits.to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fusion_loss(x, labels, ids, probs.to(torch.bfloat16), mask)
    assert got.total.dtype == torch.float32  # the reduction runs in fp32 whatever the logits' dtype
    assert got.total.item() == pytest.approx(ref.total.item(), rel=2e-2)
    got.total.backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


def test_chunked_logsumexp_matches_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    import fusion.loss as loss_mod

    monkeypatch.setattr(loss_mod, "_LSE_CHUNK_ELEMENTS", 50)  # several chunks on a small tensor
    x = (torch.randn(3, 7, 20, dtype=torch.float64) * 4).requires_grad_(True)
    y = x.detach().clone().requires_grad_(True)
    w = torch.randn(3, 7, dtype=torch.float64)

    def lse(t: torch.Tensor) -> torch.Tensor:  # over the last dim, as fusion_loss takes it: [N, V] rows
        return _lse_fp32(t.reshape(-1, t.shape[-1])).reshape(t.shape[:-1])

    (lse(x) * w).sum().backward()
    (torch.logsumexp(y, -1) * w).sum().backward()
    want = torch.logsumexp(y.detach(), -1)
    torch.testing.assert_close(lse(x.detach()).double(), want, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(x.grad, y.grad, atol=1e-6, rtol=1e-5)


def test_bad_shapes_and_kind_are_named() -> None:
    logits, labels, ids, probs, mask = _case()
    with pytest.raises(ValueError, match="kind"):
        fusion_loss(logits, labels, ids, probs, mask, kind="mse")
    with pytest.raises(ValueError, match="labels"):
        fusion_loss(logits, labels[:, :-1], ids, probs, mask)
    with pytest.raises(ValueError, match="target_ids"):
        fusion_loss(logits, labels, ids[..., :2], probs, mask)


def test_no_fused_targets_at_all_gives_the_clm_loss_and_its_gradient() -> None:
    # The CLM-only baseline trains on blocks with K = 0 target columns: same loss and gradient as torch's CE.
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 11, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[1, 4] = -100
    empty_ids = torch.zeros(2, 5, 0, dtype=torch.long)
    parts = fusion_loss(
        logits, labels, empty_ids, torch.zeros(2, 5, 0), torch.zeros(2, 5, dtype=torch.bool), lam=1.0
    )
    ref = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    assert torch.allclose(parts.total, ref, atol=1e-6) and float(parts.fusion) == 0.0
    (g_ours,) = torch.autograd.grad(parts.total, logits)
    (g_ref,) = torch.autograd.grad(ref, logits)
    assert torch.allclose(g_ours, g_ref, atol=1e-6)
