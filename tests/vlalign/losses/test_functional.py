"""Naive local-form losses against direct (loop) implementations, in fp64: values and every gradient."""

from __future__ import annotations

import math

import pytest
import torch
from loss_cases import (
    NAIVE,
    Problem,
    features,
    loop_clip,
    loop_daa_weights,
    loop_siglip,
    loop_weighted_clip,
    max_errors,
    value_and_grads,
)

from vlalign.errors import LossInputError
from vlalign.losses import clip_loss
from vlalign.losses.functional import (
    SIGLIP_INIT_LOG_SCALE,
    SIGLIP_INIT_LOGIT_BIAS,
    clip_loss_local,
    daa_weights,
    siglip_loss_local,
    weighted_clip_loss_local,
)


def _grads(loss, leaves):
    return [g.detach() for g in torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("n_rows,offset", [(6, 0), (2, 0), (2, 2), (2, 4)])
def test_clip_local_matches_loop_values_and_gradients(n_rows: int, offset: int) -> None:
    p = Problem.make(6, 5, seed=1, scale=9.0)
    rows = slice(offset, offset + n_rows)
    leaves = [p.image, p.text, p.scale]
    got = clip_loss_local(p.image[rows], p.text[rows], p.image, p.text, p.scale, offset)
    want = loop_clip(p.image[rows], p.text[rows], p.image, p.text, p.scale, offset)
    assert math.isclose(float(got.detach()), float(want.detach()), rel_tol=1e-12)
    for a, b in zip(_grads(got, leaves), _grads(want, leaves)):
        assert torch.allclose(a, b, atol=1e-12)


def test_clip_local_global_form_equals_the_existing_clip_loss() -> None:
    p = Problem.make(7, 4, seed=2)
    assert torch.equal(clip_loss_local(p.image, p.text, p.image, p.text, p.scale), clip_loss(p.image, p.text, p.scale))


@pytest.mark.parametrize("n_rows,offset", [(5, 0), (2, 3)])
def test_siglip_matches_loop_values_and_gradients(n_rows: int, offset: int) -> None:
    p = Problem.make(5, 4, seed=3, scale=math.exp(SIGLIP_INIT_LOG_SCALE), bias=SIGLIP_INIT_LOGIT_BIAS)
    rows = slice(offset, offset + n_rows)
    leaves = [p.image, p.text, p.scale, p.bias]
    got = siglip_loss_local(p.image[rows], p.text, p.scale, p.bias, offset)
    want = loop_siglip(p.image[rows], p.text, p.scale, p.bias, offset)
    assert math.isclose(float(got.detach()), float(want.detach()), rel_tol=1e-12)
    for a, b in zip(_grads(got, leaves), _grads(want, leaves)):
        assert torch.allclose(a, b, atol=1e-12)


def test_siglip_init_constants_are_the_papers() -> None:
    assert math.isclose(math.exp(SIGLIP_INIT_LOG_SCALE), 10.0) and SIGLIP_INIT_LOGIT_BIAS == -10.0


def test_daa_weights_match_the_formula_and_carry_no_gradient() -> None:
    p = Problem.make(6, 5, seed=4)
    w = daa_weights(p.image, p.text, temperature=0.05)
    assert w.shape == (6,) and not w.requires_grad
    assert torch.allclose(w, torch.tensor(loop_daa_weights(p.image, p.text, 0.05), dtype=torch.float64), atol=1e-12)
    assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-12)
    # Images farther from the anchor (the mean text) weigh more: the weights sort like 1 - cos.
    anchor = p.text.detach().mean(0)
    cos = torch.nn.functional.cosine_similarity(p.image.detach(), anchor[None], dim=-1)
    # (cos here and inside daa_weights are two float64 computations, equal to ~1e-15: compare orders only where the
    # cosines differ by more, so a near-tie cannot flip the check)
    clearly_farther = cos[:, None] < cos[None, :] - 1e-12  # (N, N) image i clearly farther than image j
    assert clearly_farther.sum() == 6 * 5 // 2 and bool((w[:, None] > w[None, :])[clearly_farther].all())
    # A higher temperature flattens them towards uniform.
    assert float(daa_weights(p.image, p.text, 10.0).std()) < float(w.std())


def test_daa_weights_reject_a_bad_temperature() -> None:
    p = Problem.make(3, 4)
    with pytest.raises(LossInputError, match="T_w > 0"):
        daa_weights(p.image, p.text, temperature=0.0)
    with pytest.raises(LossInputError, match=r"uniform_mix: expected a fraction in \[0, 1\], got 1.5"):
        daa_weights(p.image, p.text, uniform_mix=1.5)


def test_daa_uniform_mix_is_the_convex_combination_and_bounds_the_effective_batch() -> None:
    p = Problem.make(6, 5, seed=4)
    sharp = torch.tensor(loop_daa_weights(p.image, p.text, 0.01), dtype=torch.float64)  # (N,) the source's formula
    for mix in (0.0, 0.3, 1.0):
        w = daa_weights(p.image, p.text, temperature=0.01, uniform_mix=mix)  # (N,)
        assert torch.allclose(w, mix / 6 + (1 - mix) * sharp, atol=1e-12)  # two float64 paths: rounding only
        assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-12)
        assert float(w.min()) >= mix / 6 - 1e-15  # every sample keeps at least mix/N of the weight
    assert float(1 / (sharp ** 2).sum()) < 3.0  # T_w = 0.01 concentrates the weight (the mix has work to do)
    assert math.isclose(float(1 / (daa_weights(p.image, p.text, 0.01, 1.0) ** 2).sum()), 6.0, rel_tol=1e-12)


@pytest.mark.parametrize("n_rows,offset", [(6, 0), (3, 3)])
def test_weighted_clip_matches_loop_values_and_gradients(n_rows: int, offset: int) -> None:
    p = Problem.make(6, 5, seed=5, scale=7.0)
    rows = slice(offset, offset + n_rows)
    weights = daa_weights(p.image, p.text)[rows]  # (n,)
    leaves = [p.image, p.text, p.scale]
    got = weighted_clip_loss_local(p.image[rows], p.text[rows], p.image, p.text, p.scale, weights, offset)
    want = loop_weighted_clip(p.image[rows], p.text[rows], p.image, p.text, p.scale, weights, offset)
    assert math.isclose(float(got.detach()), float(want.detach()), rel_tol=1e-12)
    for a, b in zip(_grads(got, leaves), _grads(want, leaves)):
        assert torch.allclose(a, b, atol=1e-12)


def test_weighted_clip_with_uniform_weights_is_plain_infonce() -> None:
    p = Problem.make(8, 6, seed=6)
    uniform = torch.full((8,), 1 / 8, dtype=torch.float64)
    a = value_and_grads("weighted_clip", {"weighted_clip": lambda *args, row_offset: weighted_clip_loss_local(
        *args[:5], uniform, row_offset)}, p)
    b = value_and_grads("clip", NAIVE, p)
    value_err, grad_err = max_errors(a, b)
    assert value_err < 1e-13 and grad_err < 1e-13
    # ... and the DAA weights are not uniform, so the DAA loss differs from it.
    c = value_and_grads("weighted_clip", NAIVE, p)
    assert max_errors(a, c)[0] > 1e-3


@pytest.mark.parametrize("kind", ["clip", "siglip", "weighted_clip"])
def test_mean_of_local_losses_is_the_global_loss(kind: str) -> None:
    """What DDP computes: the per-rank local losses averaged over 3 'ranks' give the global value and gradient."""
    p = Problem.make(9, 4, seed=7, scale=5.0, bias=-2.0)
    whole = value_and_grads(kind, NAIVE, p)
    parts = [value_and_grads(kind, NAIVE, p, rows=slice(3 * r, 3 * r + 3)) for r in range(3)]
    mean_value = sum(v for v, _ in parts) / 3
    mean_grads = [sum(gs[i] for _, gs in parts) / 3 for i in range(len(whole[1]))]
    value_err, grad_err = max_errors(whole, (mean_value, mean_grads))
    assert value_err < 1e-12 and grad_err < 1e-12


def test_bad_inputs_name_the_argument() -> None:
    x, y = features(4, 3, seed=0)
    s = torch.tensor(10.0, dtype=torch.float64)
    with pytest.raises(LossInputError, match="row_offset=3"):
        clip_loss_local(x[:2], y[:2], x, y, s, row_offset=3)
    with pytest.raises(LossInputError, match="text_cols"):
        clip_loss_local(x, y, x, y[:, :2], s)
    with pytest.raises(LossInputError, match="text_rows: expected 4 rows"):
        clip_loss_local(x, y[:3], x, y, s)
    with pytest.raises(LossInputError, match="logit_bias"):
        siglip_loss_local(x, y, s, torch.zeros(2))
    with pytest.raises(LossInputError, match="weights_rows"):
        weighted_clip_loss_local(x, y, x, y, s, torch.ones(3))
    with pytest.raises(LossInputError, match="empty batch"):
        clip_loss_local(x[:0], y[:0], x, y, s)
