"""Symmetric InfoNCE: value against a direct loop over the formula, gradient against the analytic form."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vlalign.losses import ClipLoss, clip_loss, info_nce


def _features(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    v = F.normalize(torch.randn(n, d, generator=generator, dtype=torch.float64), dim=-1)  # (N, D)
    t = F.normalize(torch.randn(n, d, generator=generator, dtype=torch.float64), dim=-1)  # (N, D)
    return v, t


def _loop_loss(v: torch.Tensor, t: torch.Tensor, scale: float) -> float:
    """L = 1/2 (L_i->t + L_t->i), each -1/N sum_i log(exp(s v_i.t_i) / sum_j exp(s v_i.t_j)), written out."""
    n = v.shape[0]
    i2t = t2i = 0.0
    for i in range(n):
        row = [scale * float(v[i] @ t[j]) for j in range(n)]  # image i against every text
        col = [scale * float(v[j] @ t[i]) for j in range(n)]  # text i against every image
        i2t -= row[i] - math.log(sum(math.exp(x) for x in row))
        t2i -= col[i] - math.log(sum(math.exp(x) for x in col))
    return 0.5 * (i2t / n + t2i / n)


def test_clip_loss_matches_loop_implementation() -> None:
    for n, d, scale in [(2, 3, 1.0), (5, 8, 1 / 0.07), (7, 4, 30.0)]:
        v, t = _features(n, d, seed=n)
        got = clip_loss(v, t, torch.tensor(scale, dtype=torch.float64))
        assert math.isclose(float(got), _loop_loss(v, t, scale), rel_tol=1e-10)


def test_clip_loss_is_symmetric_and_rewards_alignment() -> None:
    v, t = _features(6, 16, seed=0)
    scale = torch.tensor(10.0, dtype=torch.float64)
    assert torch.allclose(clip_loss(v, t, scale), clip_loss(t, v, scale))
    aligned = clip_loss(v, v, torch.tensor(100.0, dtype=torch.float64))
    assert float(aligned) < 0.05 < float(clip_loss(v, t, scale))
    # Equal logits everywhere give the uniform-softmax loss ln N.
    same = F.normalize(torch.ones(6, 16, dtype=torch.float64), dim=-1)
    assert math.isclose(float(clip_loss(same, same, scale)), math.log(6), rel_tol=1e-12)


def test_image_to_text_gradient_matches_analytic_form() -> None:
    """dL_i->t/dv_i = 1/(N tau) (sum_j p_ij t_j - t_i), p_i = softmax_j(v_i . t_j / tau)."""
    n, d, tau = 6, 5, 0.07
    v, t = _features(n, d, seed=3)
    v.requires_grad_(True)
    loss = info_nce((v @ t.T) / tau)  # L_i->t
    (grad,) = torch.autograd.grad(loss, v)  # (N, D)
    p = torch.softmax((v.detach() @ t.T) / tau, dim=1)  # (N, N)
    analytic = (p @ t - t) / (n * tau)  # (N, D)
    assert torch.allclose(grad, analytic, atol=1e-12)


def test_clip_loss_module_returns_named_losses() -> None:
    v, t = _features(4, 8, seed=1)
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)
    out = ClipLoss()({"image_features": v, "text_features": t, "logit_scale": scale})
    assert set(out) == {"contrastive", "loss"}
    assert torch.equal(out["loss"], out["contrastive"])
    assert torch.equal(out["loss"], clip_loss(v, t, scale))
