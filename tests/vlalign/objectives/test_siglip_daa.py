"""The ``siglip`` and ``daa`` objectives against direct implementations of their formulas, in fp64: the losses and
the gradients with respect to the image and text features, the logit scale and the bias, for the naive and the
tiled implementation (a tile that does not divide the batch). DAA with uniform weights is CLIP's InfoNCE."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlalign.errors import ConfigError
from vlalign.objectives import ObjectiveContext, build_objective

N, D = 7, 5
IMPLS = [("naive", {}), ("tiled", {"tile": 3})]


def _leaves(seed: int = 0, bias: bool = True) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(N, D, generator=gen, dtype=torch.float64), dim=-1)  # (N, D)
    text = F.normalize(image + 0.9 * torch.randn(N, D, generator=gen, dtype=torch.float64), dim=-1)  # (N, D)
    out = {"image_features": image.requires_grad_(), "text_features": text.requires_grad_(),
           "logit_scale": torch.tensor(10.0 * 1.3, dtype=torch.float64, requires_grad=True)}
    if bias:
        out["logit_bias"] = torch.tensor(-4.0, dtype=torch.float64, requires_grad=True)
    return out


def _grads(loss: torch.Tensor, leaves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = list(leaves)
    return dict(zip(names, torch.autograd.grad(loss, [leaves[n] for n in names])))


def _log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return -torch.log1p(torch.exp(-x))  # the textbook form (fine in fp64 at these magnitudes)


def siglip_direct(x, y, s, b) -> torch.Tensor:
    """-(1/N) sum_i sum_j log sigmoid(z_ij (s x_i.y_j + b)), one pair at a time."""
    total = torch.zeros((), dtype=torch.float64)
    for i in range(x.shape[0]):
        for j in range(y.shape[0]):
            z = 1.0 if i == j else -1.0
            total = total - _log_sigmoid(z * (s * torch.dot(x[i], y[j]) + b))
    return total / x.shape[0]


def daa_weights_direct(x, y, temperature) -> list[float]:
    anchor = [sum(float(y[j, k]) for j in range(y.shape[0])) / y.shape[0] for k in range(y.shape[1])]
    norm_a = math.sqrt(sum(a * a for a in anchor))
    cos = [sum(float(x[i, k]) * anchor[k] for k in range(x.shape[1])) / (math.sqrt(sum(float(v) ** 2 for v in x[i])) * norm_a)
           for i in range(x.shape[0])]
    e = [math.exp((1.0 - c) / temperature) for c in cos]
    return [v / sum(e) for v in e]


def daa_direct(x, y, s, temperature) -> torch.Tensor:
    """sum_i w_i (CE_i^{i->t} + CE_i^{t->i}) / 2, with w from the anchor formula (constants, no gradient)."""
    weights = daa_weights_direct(x.detach(), y.detach(), temperature)
    total = torch.zeros((), dtype=torch.float64)
    for i in range(x.shape[0]):
        i2t = torch.logsumexp(torch.stack([s * torch.dot(x[i], y[j]) for j in range(y.shape[0])]), 0) - s * torch.dot(x[i], y[i])
        t2i = torch.logsumexp(torch.stack([s * torch.dot(y[i], x[j]) for j in range(x.shape[0])]), 0) - s * torch.dot(y[i], x[i])
        total = total + weights[i] * 0.5 * (i2t + t2i)
    return total


@pytest.mark.parametrize("impl,extra", IMPLS)
def test_siglip_loss_and_gradients_equal_the_direct_formula(impl, extra) -> None:
    leaves = _leaves()
    objective = build_objective("siglip", {"loss_impl": impl, **extra}, ObjectiveContext())
    terms = objective(leaves, {})
    assert set(terms) == {"loss", "sigmoid"} and terms["loss"].dtype == torch.float64
    got = _grads(terms["loss"], leaves)
    ref_leaves = _leaves()
    expected = siglip_direct(ref_leaves["image_features"], ref_leaves["text_features"], ref_leaves["logit_scale"],
                             ref_leaves["logit_bias"])
    want = _grads(expected, ref_leaves)
    assert torch.allclose(terms["loss"], expected, rtol=1e-12, atol=1e-12)
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-10, atol=1e-12), name
    assert float(want["logit_bias"].abs()) > 1e-3  # the bias is learnt: it has a real gradient


@pytest.mark.parametrize("impl,extra", IMPLS)
@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_daa_loss_and_gradients_equal_the_direct_formula(impl, extra, temperature) -> None:
    leaves = _leaves(seed=1, bias=False)
    objective = build_objective("daa", {"temperature": temperature, "loss_impl": impl, **extra}, ObjectiveContext())
    terms = objective(leaves, {})
    got = _grads(terms["loss"], leaves)
    ref = _leaves(seed=1, bias=False)
    expected = daa_direct(ref["image_features"], ref["text_features"], ref["logit_scale"], temperature)
    want = _grads(expected, ref)
    assert torch.allclose(terms["loss"], expected, rtol=1e-12, atol=1e-12)
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-10, atol=1e-12), name
    weights = torch.tensor(daa_weights_direct(ref["image_features"].detach(), ref["text_features"].detach(), temperature))
    assert float(terms["daa_effective_batch"]) == pytest.approx(float(1 / (weights ** 2).sum()), rel=1e-6)
    assert float(terms["daa_max_weight"]) == pytest.approx(float(weights.max() * N), rel=1e-6)


def test_daa_weights_favour_images_far_from_the_anchor() -> None:
    leaves = _leaves(seed=2, bias=False)
    x, y = leaves["image_features"].detach(), leaves["text_features"].detach()
    weights = torch.tensor(daa_weights_direct(x, y, 0.05))
    cos = F.cosine_similarity(x, y.mean(0, keepdim=True), dim=-1)  # (N,)
    # lower cosine to the anchor, higher weight (compared where the two float64 cosine computations cannot disagree)
    clearly_farther = cos[:, None] < cos[None, :] - 1e-12  # (N, N)
    assert clearly_farther.sum() == N * (N - 1) // 2 and bool((weights[:, None] > weights[None, :])[clearly_farther].all())
    assert float(weights.max() / weights.min()) > 2.0  # T_w = 0.05 is sharp


@pytest.mark.parametrize("impl,extra", IMPLS)
def test_daa_with_uniform_weights_is_infonce(impl, extra) -> None:
    """T_w -> infinity makes the weights uniform (1/N): the loss and every gradient are CLIP's."""
    leaves = _leaves(seed=3, bias=False)
    daa = build_objective("daa", {"temperature": 1e12, "loss_impl": impl, **extra}, ObjectiveContext())(leaves, {})
    got = _grads(daa["loss"], leaves)
    assert float(daa["daa_effective_batch"]) == pytest.approx(N, rel=1e-9)
    ref = _leaves(seed=3, bias=False)
    clip = build_objective("clip", {"loss_impl": impl, **extra}, ObjectiveContext())(ref, {})
    want = _grads(clip["loss"], ref)
    assert torch.allclose(daa["loss"], clip["loss"], rtol=1e-12, atol=1e-12)
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-10, atol=1e-12), name
    # and with the default T_w the loss is not InfoNCE (the test above can fail)
    sharp = build_objective("daa", {"loss_impl": impl, **extra}, ObjectiveContext())(_leaves(seed=3, bias=False), {})
    assert not torch.allclose(sharp["loss"], clip["loss"], rtol=1e-6)
    # uniform_mix = 1 is InfoNCE too, at any T_w; the effective batch is then N (the uniform weights' 1/sum w^2)
    mixed = build_objective("daa", {"temperature": 0.05, "uniform_mix": 1.0, "loss_impl": impl, **extra},
                            ObjectiveContext())(_leaves(seed=3, bias=False), {})
    assert float(mixed["daa_effective_batch"]) == pytest.approx(N, rel=1e-9)
    assert torch.allclose(mixed["loss"], clip["loss"], rtol=1e-12, atol=1e-12)
    assert float(sharp["daa_effective_batch"]) < N - 0.1  # and the sharp weights' is below N


def test_daa_effective_batch_with_a_uniform_mix_is_one_over_the_sum_of_squared_weights() -> None:
    leaves = _leaves(seed=1, bias=False)
    terms = build_objective("daa", {"temperature": 0.05, "uniform_mix": 0.5}, ObjectiveContext())(leaves, {})
    x, y = leaves["image_features"].detach(), leaves["text_features"].detach()
    weights = 0.5 / N + 0.5 * torch.tensor(daa_weights_direct(x, y, 0.05), dtype=torch.float64)  # (N,) the direct mix
    # the metric is a float32 of a float64 sum: compare at float32's resolution
    assert float(terms["daa_effective_batch"]) == pytest.approx(float(1 / (weights ** 2).sum()), rel=1e-6)
    assert float(terms["daa_max_weight"]) == pytest.approx(float(weights.max() * N), rel=1e-6)
    ref = _leaves(seed=1, bias=False)
    expected_terms = []
    for i in range(N):  # the loss with these weights, one row at a time
        ce_it = -torch.log_softmax(ref["logit_scale"] * ref["image_features"][i] @ ref["text_features"].T, 0)[i]
        ce_ti = -torch.log_softmax(ref["logit_scale"] * ref["text_features"][i] @ ref["image_features"].T, 0)[i]
        expected_terms.append(weights[i] * (ce_it + ce_ti) / 2)
    assert torch.allclose(terms["loss"], torch.stack(expected_terms).sum(), rtol=1e-12, atol=1e-12)


def test_options_and_missing_bias_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match=r"objective daa: temperature=0; expected T_w > 0"):
        build_objective("daa", {"temperature": 0})
    with pytest.raises(ConfigError, match=r"objective daa: uniform_mix=-0.1; expected a fraction in \[0, 1\]"):
        build_objective("daa", {"uniform_mix": -0.1})
    with pytest.raises(ConfigError, match=r"objective siglip: loss_impl='fast'"):
        build_objective("siglip", {"loss_impl": "fast"})
    with pytest.raises(ConfigError, match=r"unknown objective_options \['temperature'\]"):
        build_objective("siglip", {"temperature": 0.1})
    with pytest.raises(ConfigError, match="needs a model with a learnable logit bias.*init_logit_bias: -10.0"):
        build_objective("siglip", {})(_leaves(bias=False), {})


def test_siglip_model_starts_at_the_papers_values() -> None:
    """The recipe's model overrides give t' = log 10 (scale 10) and b = -10, and the objective trains both."""
    from vlalign.models import build_model, get_model_config

    from shared import TINY

    model = build_model(get_model_config("tiny-vit-bert", **TINY, init_temperature=0.1, init_logit_bias=-10.0))
    with torch.no_grad():
        assert float(model.logit_scale) == pytest.approx(math.log(10.0)) and float(model.scale()) == pytest.approx(10.0)
        assert float(model.logit_bias) == -10.0
    ids = torch.tensor([[2, 10, 11, 3], [2, 12, 3, 0]])
    out = model({"pixels": torch.randn(2, 3, 32, 32), "input_ids": ids, "attention_mask": (ids > 0).long()})
    build_objective("siglip", {})(out, {})["loss"].backward()
    assert model.logit_bias.grad is not None and model.logit_scale.grad is not None
