"""The training engine's seams: objective and architecture registries (a test-only objective and arch plug in without
touching the loop), checkpoint round trips for every arch, never-trainable teachers, exact gradient accumulation,
and that device and precision settings are honoured."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlalign.errors import ConfigError
from vlalign.models import CLIPModel, build_model, get_model_config, list_archs, mark_never_trainable, register_arch
from vlalign.objectives import Objective, ObjectiveContext, build_objective, list_objectives, register_objective
from vlalign.train import CheckpointStore, StageConfig, load_checkpoint, model_from_checkpoint, train_stage
from vlalign.train.optim import build_optimizer, set_trainable

from shared import TINY, make_manifest


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_manifest(tmp_path_factory.mktemp("images"))


# ------------------------------------------------------------------------------------------------
# A test-only objective and a test-only architecture, registered from outside the library
# ------------------------------------------------------------------------------------------------


@dataclass
class CosineOptions:
    margin: float = 0.0  # pull matching pairs to at least this cosine


@register_objective("test_cosine", options=CosineOptions)
class CosineObjective(Objective):
    """1 - cos(v_i, t_i) averaged: no negatives; logs two terms and counts after_step calls in a buffer."""

    def __init__(self, options: CosineOptions, context: ObjectiveContext) -> None:
        super().__init__(context)
        self.options = options
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.seen_dtypes: list[torch.dtype] = []

    def forward(self, out, batch):
        self.seen_dtypes.append(out["image_features"].dtype)
        cos = (out["image_features"] * out["text_features"]).sum(-1)  # (B,)
        loss = (1.0 - cos - self.options.margin).clamp_min(0).mean()
        return {"loss": loss, "mean_cos": cos.mean().detach()}

    def after_step(self, model, step):
        self.calls += 1


@dataclass
class TeacherOptions:
    teacher_momentum: float = 0.5  # EMA weight of the teacher's own projection


class DualWithTeacher(CLIPModel):
    """The dual encoder plus an EMA copy of the image projection (a never-trainable teacher) and a step counter."""

    def __init__(self, cfg, vocab_size, load_pretrained, options: TeacherOptions) -> None:
        super().__init__(cfg, vocab_size, load_pretrained)
        self.momentum = options.teacher_momentum
        self.teacher_proj = mark_never_trainable(copy.deepcopy(self.image_proj))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def forward(self, batch):
        out = super().forward(batch)
        with torch.no_grad():
            out["teacher_features"] = F.normalize(self.teacher_proj(self.image_outputs(batch["pixels"])[1]), dim=-1)
        return out


@register_arch("test_dual_teacher", options=TeacherOptions)
def _build_teacher(cfg, vocab_size, load_pretrained=True, options=None):
    return DualWithTeacher(cfg, vocab_size, load_pretrained, options)


@dataclass
class EmaOptions:
    pass


@register_objective("test_clip_ema", options=EmaOptions)
class ClipWithEma(Objective):
    """CLIP loss; after each step the model's teacher follows the student by EMA (two foreach calls)."""

    coupled_keys = ("image_features", "text_features")

    def __init__(self, options, context):
        super().__init__(context)
        self.clip = build_objective("clip", {}, context)

    def forward(self, out, batch):
        return self.clip(out, batch)

    def after_step(self, model, step):
        teacher, student = list(model.teacher_proj.parameters()), list(model.image_proj.parameters())
        torch._foreach_mul_(teacher, model.momentum)
        torch._foreach_add_(teacher, student, alpha=1 - model.momentum)
        model.updates += 1


#: One tiny config per registered architecture (a new arch must add one here: the round-trip test checks it).
ARCH_CONFIGS = {
    "dual": {},
    "test_dual_teacher": {"arch": "test_dual_teacher", "arch_options": {"teacher_momentum": 0.5}},
    "fusion": {"arch": "fusion", "arch_options": {"fusion_layers": 1, "decoder_layers": 1}},
}


def _stage(**overrides) -> StageConfig:
    fields = {"name": "s", "trainable": ["all"], "max_steps": 3, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1,
              "checkpoint_every": 0, "log_every": 1, "caption_langs": ["en", "zh"], "seed": 0, "device": "cpu"}
    return StageConfig(**{**fields, **overrides})


def _cfg(**extra):
    return get_model_config("tiny-vit-bert", **{**TINY, **extra})


def test_registries_list_and_refuse_unknown_names() -> None:
    assert {"clip", "test_cosine", "test_clip_ema"} <= set(list_objectives())
    assert {"dual", "test_dual_teacher"} <= set(list_archs())
    with pytest.raises(ConfigError, match="unknown objective 'nope'; registered objectives are"):
        _stage(objective="nope")
    with pytest.raises(ConfigError, match=r"objective 'test_cosine': unknown objective_options \['gamma'\]"):
        _stage(objective="test_cosine", objective_options={"gamma": 1})
    with pytest.raises(ConfigError, match="unknown model arch 'nope'"):
        _cfg(arch="nope")
    with pytest.raises(ConfigError, match=r"arch 'test_dual_teacher': unknown arch_options \['beta'\]"):
        _cfg(arch="test_dual_teacher", arch_options={"beta": 1})


def test_a_new_objective_and_arch_train_through_the_unchanged_loop(tmp_path, manifest) -> None:  # noqa: F811
    cfg = _cfg(**ARCH_CONFIGS["test_dual_teacher"])
    records = []

    class Recorder:
        def on_step(self, step, metrics):
            records.append(metrics)

        def on_checkpoint(self, path, step):
            pass

    final = train_stage(cfg, _stage(objective="test_cosine", objective_options={"margin": 0.1}), manifest, None,
                        CheckpointStore(tmp_path / "cos"), [Recorder()])
    assert {"loss", "mean_cos", "lr", "temperature"} <= set(records[0])  # every term is logged
    assert final["objective"]["calls"].item() == 3  # after_step ran each step, its buffer is checkpointed
    ema = train_stage(cfg, _stage(objective="test_clip_ema"), manifest, None, CheckpointStore(tmp_path / "ema"))
    assert ema["model"]["updates"].item() == 3
    start = build_model(cfg).state_dict()
    assert not torch.equal(ema["model"]["teacher_proj.weight"], start["teacher_proj.weight"])  # moved by EMA only


def test_never_trainable_teacher_stays_out_of_the_optimizer() -> None:
    model = build_model(_cfg(**ARCH_CONFIGS["test_dual_teacher"]))
    trainable = set_trainable(model, ["all"])
    assert not [n for n in trainable if n.startswith("teacher_proj")]
    assert not model.teacher_proj.weight.requires_grad
    with pytest.raises(ConfigError, match="match no parameter"):  # a prefix that only names the teacher unfreezes nothing
        set_trainable(model, ["teacher_projection"])
    set_trainable(model, ["teacher_proj", "image_proj"])
    assert not model.teacher_proj.weight.requires_grad and model.image_proj.weight.requires_grad
    optimizer = build_optimizer(model, 1e-3, 0.1)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(model.teacher_proj.weight) not in in_optimizer


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_checkpoint_round_trip_for_every_arch(tmp_path, manifest, arch) -> None:  # noqa: F811
    assert set(ARCH_CONFIGS) >= set(list_archs()), "add a tiny config for every registered arch to ARCH_CONFIGS"
    cfg = _cfg(**ARCH_CONFIGS[arch])
    store = CheckpointStore(tmp_path / arch)
    final = train_stage(cfg, _stage(max_steps=2), manifest, None, store)
    loaded = load_checkpoint(store.final_path)
    assert loaded["model_config"]["arch"] == arch
    model = model_from_checkpoint(loaded)
    assert type(model) is type(build_model(cfg))
    for key, value in model.state_dict().items():
        assert torch.equal(value, final["model"][key]), key
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[2, 10, 11, 3], [2, 12, 3, 0]])
    batch = {"pixels": pixels, "input_ids": ids, "attention_mask": (ids > 0).long()}
    with torch.no_grad():
        again = model_from_checkpoint(str(store.final_path))
        assert torch.equal(model(batch)["image_features"], again(batch)["image_features"])
        assert torch.equal(model.encode_text(ids, batch["attention_mask"]), again.encode_text(ids, batch["attention_mask"]))


def _grads_after_one_step(cfg, stage, manifest) -> dict[str, torch.Tensor]:  # noqa: F811
    """The gradients of the first optimizer step (lr 0 keeps the weights, so the grads are what we compare)."""
    from vlalign.train.loop import build_train_data, train_step
    from vlalign.train.runtime import Runtime
    from vlalign.distributed.context import DistContext

    torch.manual_seed(0)
    model = build_model(cfg)
    set_trainable(model, stage.trainable)
    runtime = Runtime.create("cpu", stage.precision, DistContext())
    source = build_train_data(manifest, cfg, stage, DistContext(), runtime)
    objective = build_objective(stage.objective, stage.objective_options, ObjectiveContext(model=model))
    batch = next(iter(source.batches(0, 0)))
    model.train()
    torch.manual_seed(123)  # the same dropout masks whatever the accumulation
    terms = train_step(model, objective, runtime, batch, stage.accumulate)
    return {"loss": terms["loss"], **{n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}


@pytest.mark.parametrize("accumulate", [2, 4])
def test_gradient_accumulation_is_exact_for_the_contrastive_loss(manifest, accumulate) -> None:  # noqa: F811
    """2 or 4 micro-batches give the loss and gradients of one batch of 8 (fp32). (With dropout the micro-batches
    draw other masks than one big forward, so the comparison is made without dropout; inside an accumulated step
    the masks are replayed, so the cached and the live features of a micro-batch agree.)"""
    cfg = _cfg(**{"text.dropout": 0.0})
    full = _grads_after_one_step(cfg, _stage(accumulate=1), manifest)
    micro = _grads_after_one_step(cfg, _stage(accumulate=accumulate), manifest)
    assert set(full) == set(micro)
    assert torch.allclose(micro["loss"], full["loss"], atol=1e-6)
    for name, grad in full.items():
        assert torch.allclose(micro[name], grad, atol=1e-6, rtol=1e-4), name
    # plain averaging (what a naive loop does) is not the same thing: each micro-batch sees only its own negatives
    plain = _grads_after_one_step(cfg, _stage(accumulate=accumulate, objective="test_clip_plain"), manifest)
    assert not torch.allclose(plain["image_proj.weight"], full["image_proj.weight"], atol=1e-4)


@register_objective("test_clip_plain", options=EmaOptions)
class ClipUncoupled(Objective):
    """CLIP's loss without declaring its coupling: accumulation averages micro-batch losses (the naive way)."""

    def __init__(self, options, context):
        super().__init__(context)
        self.clip = build_objective("clip", {}, context)

    def forward(self, out, batch):
        return self.clip(out, batch)


def test_bf16_autocast_on_cpu_is_used_and_trains(tmp_path, manifest) -> None:  # noqa: F811
    store = CheckpointStore(tmp_path / "bf16")
    stage = _stage(objective="test_cosine", precision="bf16")
    final = train_stage(_cfg(), stage, manifest, None, store)
    objective_dtypes = []

    from vlalign.train.loop import build_train_data, train_step
    from vlalign.train.runtime import Runtime
    from vlalign.distributed.context import DistContext

    runtime = Runtime.create("cpu", "bf16", DistContext())
    model = model_from_checkpoint(final).train()
    objective = build_objective("test_cosine", {}, ObjectiveContext(model=model))
    batch = next(iter(build_train_data(manifest, _cfg(), stage, DistContext(), runtime).batches(0, 0)))
    train_step(model, objective, runtime, batch, 1)
    objective_dtypes = objective.seen_dtypes
    assert objective_dtypes == [torch.bfloat16]  # the projections ran under bf16 autocast
    assert all(v.dtype == torch.float32 for v in final["model"].values() if v.is_floating_point())  # weights stay fp32
    assert final["stage_config"]["precision"] == "bf16" and final["history"][-1]["loss"] == final["history"][-1]["loss"]


def test_fp16_uses_a_gradient_scaler_saved_in_the_checkpoint(tmp_path, manifest) -> None:  # noqa: F811
    final = train_stage(_cfg(), _stage(precision="fp16", max_steps=2), manifest, None, CheckpointStore(tmp_path / "fp16"))
    assert final["scaler"] is not None and "scale" in final["scaler"]
    fp32 = train_stage(_cfg(), _stage(max_steps=2), manifest, None, CheckpointStore(tmp_path / "fp32"))
    assert fp32["scaler"] is None


def test_device_setting_is_honoured(tmp_path, manifest) -> None:  # noqa: F811
    from vlalign.train.runtime import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="device='cuda' but no CUDA GPU"):
            train_stage(_cfg(), _stage(device="cuda"), manifest, None, CheckpointStore(tmp_path / "cuda"))
    with pytest.raises(ConfigError, match=r"device='tpu', expected one of"):
        _stage(device="tpu")
    with pytest.raises(ConfigError, match=r"precision='fp8'"):
        _stage(precision="fp8")
    with pytest.raises(ConfigError, match="accumulate=3, expected a divisor of batch_size"):
        _stage(accumulate=3)


class StopAt:
    """Records the steps it sees; raises KeyboardInterrupt at ``stop`` (an interrupted run)."""

    def __init__(self, stop: int | None = None) -> None:
        self.stop, self.steps = stop, []

    def on_step(self, step, metrics):
        self.steps.append(step)
        if step == self.stop:
            raise KeyboardInterrupt(f"stopped at step {step}")

    def on_checkpoint(self, path, step):
        pass


@pytest.fixture
def deterministic_kernels():
    """Deterministic CUDA kernels (cuDNN, and torch's deterministic variants of atomic-add kernels) for one test, so
    two runs on one GPU may be compared bit for bit; benchmarks/gpu_check.sh sets CUBLAS_WORKSPACE_CONFIG for cuBLAS."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it)")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_a_bf16_stage_interrupted_then_rerun_resumes_to_the_same_weights(tmp_path, manifest, device,  # noqa: F811
                                                                          deterministic_kernels) -> None:
    # 4 steps an epoch: the checkpoint at step 3 is mid-epoch; the run stops at step 5 and the rerun resumes from 3
    stage = _stage(device=device, precision="bf16", batch_size=4, max_steps=6, checkpoint_every=3)
    reference = train_stage(_cfg(), stage, manifest, None, CheckpointStore(tmp_path / "reference"))
    store = CheckpointStore(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        train_stage(_cfg(), stage, manifest, None, store, callbacks=[StopAt(5)])
    assert load_checkpoint(store.latest())["step"] == 3
    seen = StopAt()
    final = train_stage(_cfg(), stage, manifest, None, store, callbacks=[seen])
    assert seen.steps == [4, 5, 6] and final["completed"]  # resumed after step 3, not restarted
    assert [h["loss"] for h in final["history"]] == [h["loss"] for h in reference["history"]]
    assert final["model"].keys() == reference["model"].keys()
    for key, value in reference["model"].items():
        assert torch.equal(final["model"][key], value), key
    assert all(v.device.type == "cpu" for v in final["model"].values())  # checkpoints are device-free
    assert device == "cpu" or "cuda" in final["rng"]  # the CUDA generator's state is checkpointed and restored
