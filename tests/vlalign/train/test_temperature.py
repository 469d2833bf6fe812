"""The learnable temperature: kept in [0, ln max_logit_scale] by an in-place clamp after every optimizer step
(open_clip), with the gradient flowing at every value it can take, the cap included.

Before this, the scale was only clamped in forward: once a step carried ``logit_scale`` to the cap its gradient was
0 and nothing pulled it back, so the temperature froze at 1/100 for good (issue 16). The loop tests below run the
real ``train_stage`` with a test-only objective whose loss is +-exp(logit_scale), and read back, from the
objective's checkpointed buffers, the raw parameter and its gradient at every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from vlalign.models import apply_parameter_constraints, build_model, get_model_config
from vlalign.objectives import Objective, ObjectiveContext, register_objective
from vlalign.train import CheckpointStore, StageConfig, train_stage

from shared import TINY, make_manifest

CAP = 100.0
LOG_CAP32 = float(torch.tensor(math.log(CAP)))  # ln 100 as the float32 parameter holds it
START = math.log(CAP) - 0.02  # 0.02 below the cap: exp(START) = 98.02


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_manifest(tmp_path_factory.mktemp("images"))


@dataclass
class ScalePullOptions:
    higher_steps: int = 0  # the first steps' loss wants a HIGHER scale (-s), every later step's a LOWER one (+s)


@register_objective("test_scale_pull", options=ScalePullOptions)
class ScalePull(Objective):
    """loss = -s for the first ``higher_steps`` steps, then +s (s = exp(logit_scale) as the model outputs it).
    ``after_step`` records the raw parameter and its gradient in buffers, so they come back in the checkpoint."""

    def __init__(self, options: ScalePullOptions, context: ObjectiveContext) -> None:
        super().__init__(context)
        self.options = options
        self.register_buffer("raw", torch.full((context.total_steps,), float("nan")))  # (S,) logit_scale after step
        self.register_buffer("grad", torch.full((context.total_steps,), float("nan")))  # (S,) its gradient that step
        self.register_buffer("done", torch.zeros((), dtype=torch.long))

    def forward(self, out, batch):
        sign = -1.0 if int(self.done) < self.options.higher_steps else 1.0
        return {"loss": sign * out["logit_scale"]}

    def after_step(self, model, step):
        self.raw[step - 1] = model.logit_scale.detach()
        self.grad[step - 1] = model.logit_scale.grad.detach()
        self.done += 1


def _train(tmp_path, manifest, start: float, higher_steps: int, steps: int = 60, lr: float = 0.01, **cfg_extra):
    """``steps`` steps of the real loop training logit_scale alone from ``start``; (final checkpoint, history)."""
    cfg = get_model_config("tiny-vit-bert", **TINY, init_temperature=math.exp(-start), max_logit_scale=CAP, **cfg_extra)
    assert build_model(cfg).logit_scale.item() == pytest.approx(start, abs=1e-6)
    stage = StageConfig(name="t", trainable=["logit_scale"], max_steps=steps, batch_size=4, lr=lr, warmup_steps=0,
                        min_lr_ratio=1.0, checkpoint_every=0, log_every=1, caption_langs=["en"], seed=0,
                        objective="test_scale_pull", objective_options={"higher_steps": higher_steps})
    final = train_stage(cfg, stage, manifest, None, CheckpointStore(tmp_path / f"h{higher_steps}-{start:.3f}"))
    return final, final["objective"]


@pytest.mark.parametrize("higher_steps", [0, 10], ids=["lower-from-the-start", "to-the-cap-then-lower"])
def test_scale_falls_from_just_below_the_cap_when_the_loss_wants_it_lower(tmp_path, manifest, higher_steps) -> None:
    """60 steps from 0.02 below the cap. With 10 steps wanting a higher scale first, the parameter reaches the cap
    and must come back down: before the fix it crossed the cap, its gradient was 0 from then on, and the scale
    stayed at 100.0 (this case fails on that code)."""
    final, seen = _train(tmp_path, manifest, START, higher_steps)
    raw, grad = seen["raw"], seen["grad"]  # (60,) each, the parameter after step k and its gradient at step k
    assert bool((raw <= LOG_CAP32).all()), raw.max()  # never above the cap
    assert bool((grad != 0).all()), grad  # the gradient never vanishes, not even at the cap
    if higher_steps:
        assert float(raw[:higher_steps].max()) == LOG_CAP32  # it did reach the cap (projected onto it exactly)
    assert float(raw[-1]) < START - 0.1  # and it fell well below the start
    history = [h["logit_scale"] for h in final["history"]]
    assert history[-1] < math.exp(START) and max(history) <= CAP * (1 + 1e-6)
    assert float(final["model"]["logit_scale"]) == float(raw[-1])  # the constrained value is what is saved


def test_scale_never_exceeds_the_cap_when_the_loss_wants_it_higher(tmp_path, manifest) -> None:
    final, seen = _train(tmp_path, manifest, START, higher_steps=60)
    raw = seen["raw"]  # (60,)
    assert bool((raw <= LOG_CAP32).all()) and float(raw[-1]) == LOG_CAP32, raw  # pinned at the cap, never above
    assert bool((seen["grad"] < 0).all())  # the loss keeps pushing up (a live gradient), the clamp holds it
    assert final["history"][-1]["logit_scale"] == pytest.approx(CAP, rel=1e-6)


def test_scale_stops_at_the_lower_bound_one(tmp_path, manifest) -> None:
    """The projection is open_clip's clamp_(0, ln 100): exp(logit_scale) >= 1, temperature <= 1."""
    _, seen = _train(tmp_path, manifest, math.log(1 / 0.07), higher_steps=0, steps=20, lr=0.5)
    assert bool((seen["raw"] >= 0).all()) and float(seen["raw"][-1]) == 0.0, seen["raw"]


@pytest.mark.parametrize("arch", ["dual", "fusion"])
def test_gradient_flows_at_the_cap_and_only_values_above_it_are_capped(arch) -> None:
    """At exactly the cap d exp(t)/dt = exp(t) = 100 (``Tensor.clamp`` with a number as bound gives 0 there in
    torch 2.14); a value above it (old weights) is read as the cap, with no gradient."""
    options = {"arch": arch, "arch_options": {"fusion_layers": 1, "decoder_layers": 0}} if arch == "fusion" else {}
    model = build_model(get_model_config("tiny-vit-bert", **TINY, **options))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) > 100
    assert model.scale().item() == pytest.approx(CAP, rel=1e-6)
    model.scale().backward()
    assert float(model.logit_scale.grad) == 0.0  # above the cap: capped, no gradient
    assert apply_parameter_constraints(model) == [""]  # the model's own hook, found by the generic walk
    assert model.logit_scale.item() == LOG_CAP32
    model.logit_scale.grad = None
    model.scale().backward()
    assert float(model.logit_scale.grad) == pytest.approx(CAP, rel=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(-3.0)
    apply_parameter_constraints(model)
    assert model.logit_scale.item() == 0.0


def test_constraints_leave_frozen_parameters_and_the_siglip_bias_alone() -> None:
    model = build_model(get_model_config("tiny-vit-bert", **TINY, init_temperature=0.1, init_logit_bias=-10.0))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
        model.logit_bias.fill_(-1000.0)  # SigLIP's bias has no bound (big_vision, open_clip)
    model.logit_scale.requires_grad_(False)  # a stage that freezes the scale keeps its loaded value
    apply_parameter_constraints(model)
    assert model.logit_scale.item() == 10.0 and model.logit_bias.item() == -1000.0
    assert model.scale().item() == pytest.approx(CAP, rel=1e-6)  # still read as the cap


def test_every_submodule_with_a_hook_is_constrained() -> None:
    """Any module (a tower, a head) can bound its own parameters; the loop needs no line for it."""

    class UnitNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.full((3,), 2.0))  # (3,)

        def constrain_parameters_(self) -> None:
            self.weight.div_(self.weight.norm())

    model = build_model(get_model_config("tiny-vit-bert", **TINY))
    model.text_proj = nn.Sequential(model.text_proj, UnitNorm())
    assert apply_parameter_constraints(model) == ["", "text_proj.1"]
    assert model.text_proj[1].weight.norm().item() == pytest.approx(1.0)
