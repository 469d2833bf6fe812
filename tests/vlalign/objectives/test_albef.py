"""ALBEF / BLIP objectives: each formula against a direct implementation, and the objective in the real loop
(teacher never in the optimizer, queues and teacher checkpointed and resumed exactly)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from vlalign.errors import ConfigError
from vlalign.models import build_model, get_model_config
from vlalign.objectives import ObjectiveContext, build_objective
from vlalign.objectives.albef import (
    IGNORE, distillation_targets, ema_update, enqueue, mask_tokens, positive_mask, ramped_alpha, sample_negatives,
    soft_cross_entropy,
)
from vlalign.train import CheckpointStore, StageConfig, load_checkpoint, train_stage
from vlalign.train.optim import build_optimizer, set_trainable

from shared import TINY, make_manifest

FUSION = {"arch": "fusion", "arch_options": {"fusion_layers": 1, "decoder_layers": 1}}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    return make_manifest(tmp_path_factory.mktemp("albef") / "images")


def _cfg(**extra):
    return get_model_config("tiny-vit-bert", **{**TINY, "text.dropout": 0.0, **FUSION, **extra})


def _stage(**overrides) -> StageConfig:
    fields = {"name": "s", "trainable": ["all"], "max_steps": 4, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1,
              "checkpoint_every": 0, "log_every": 1, "caption_langs": ["en", "zh"], "seed": 0, "device": "cpu",
              "objective": "albef", "objective_options": {"queue_size": 12, "lm_weight": 1.0}}
    return StageConfig(**{**fields, **overrides})


# ------------------------------------------------------------------------------------------------ formulas


def test_ema_update_is_the_momentum_formula() -> None:
    torch.manual_seed(0)
    teacher = [torch.randn(3, 4), torch.randn(5)]
    student = [torch.randn(3, 4), torch.randn(5)]
    expected = [0.995 * t + 0.005 * s for t, s in zip(teacher, student)]
    ema_update(teacher, student, 0.995)
    for got, want in zip(teacher, expected):
        assert torch.allclose(got, want, atol=1e-7)
    ema_update(teacher, student, 0.0)  # m = 0: the teacher becomes the student
    assert all(torch.equal(t, s) for t, s in zip(teacher, student))


def test_distillation_targets_are_the_alpha_mixture() -> None:
    torch.manual_seed(1)
    positives = torch.tensor([[1, 0, 0, 1, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    logits = torch.randn(2, 5)
    alpha = 0.4
    got = distillation_targets(positives, logits, alpha)
    for i in range(2):
        exp = [math.exp(float(v)) for v in logits[i]]
        n_pos = int(positives[i].sum())
        for j in range(5):
            want = alpha * exp[j] / sum(exp) + (1 - alpha) * float(positives[i, j]) / n_pos
            assert abs(float(got[i, j]) - want) < 1e-6
    assert torch.allclose(got.sum(dim=1), torch.ones(2))
    assert torch.equal(distillation_targets(positives, logits, 0.0), distillation_targets(positives, None, 0.4))
    # the soft cross-entropy against those targets
    student = torch.randn(2, 5)
    want = -sum(float(got[i, j]) * float(F.log_softmax(student[i], 0)[j]) for i in range(2) for j in range(5)) / 2
    assert abs(float(soft_cross_entropy(student, got)) - want) < 1e-5


def test_alpha_ramps_over_the_first_epoch() -> None:
    assert [ramped_alpha(0.4, s, 4) for s in range(6)] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4])
    assert ramped_alpha(0.4, 0, 0) == 0.4


def test_queue_masking_by_image_id() -> None:
    rows = torch.tensor([7, 3, 9])
    cols = torch.tensor([7, 3, 9, 3, -1, 7, 5])  # the batch, then the queue (an empty slot -1)
    got = positive_mask(rows, cols, same_image=True)
    want = torch.tensor([[rows[i] == cols[j] for j in range(7)] for i in range(3)])
    assert torch.equal(got, want)
    assert got[1, 3] and got[0, 5] and not got[2, 3]  # the queue's earlier captions of images 3 and 7 are positives
    only_own = positive_mask(rows, cols, same_image=False)  # ALBEF: the row's own pair only
    assert torch.equal(only_own, torch.eye(3, 7, dtype=torch.bool))


def test_enqueue_is_a_ring_buffer() -> None:
    queue = torch.zeros(5, 2)
    ptr = enqueue(queue, 0, torch.ones(3, 2))
    assert ptr == 3
    ptr = enqueue(queue, ptr, torch.arange(6.0).view(3, 2) + 10)  # wraps around
    assert ptr == 1
    assert queue[:, 0].tolist() == [14.0, 1.0, 1.0, 10.0, 12.0]
    assert enqueue(queue, 4, torch.arange(14.0).view(7, 2)) == 1  # more rows than slots: the newest 5 win
    assert sorted(queue[:, 0].tolist()) == [4.0, 6.0, 8.0, 10.0, 12.0]


def test_hard_negatives_follow_the_softmax_and_never_pick_a_positive() -> None:
    sim = torch.tensor([[5.0, 1.0, 2.0, 0.0], [0.5, 3.0, 0.5, 1.5], [1.0, 1.0, 1.0, 1.0]])
    positives = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_negatives(sim, positives, generator=generator) for _ in range(4000)])  # (4000, 3)
    assert (draws[:, 2] == -1).all()  # every caption of row 2 is positive: no negative
    for row in (0, 1):
        picked = draws[:, row]
        assert not positives[row, picked].any()  # a positive is never drawn
        negatives = ~positives[row]
        exp = torch.where(negatives, sim[row].exp(), torch.zeros(4))
        want = exp / exp.sum()  # softmax over the non-positives
        freq = torch.bincount(picked, minlength=4).float() / len(picked)
        assert torch.allclose(freq, want, atol=0.03), (row, freq, want)
    uniform = torch.stack([sample_negatives(sim, positives, hard=False, generator=generator) for _ in range(2000)])
    freq = torch.bincount(uniform[:, 1], minlength=4).float() / 2000
    assert freq[1] == 0 and freq[3] == 0 and abs(float(freq[0]) - 0.5) < 0.05


def test_mlm_masking_ratios() -> None:
    generator = torch.Generator().manual_seed(0)
    b, length = 400, 40
    ids = torch.randint(10, 1000, (b, length), generator=generator)
    ids[:, 0], ids[:, 30] = 2, 3  # [CLS], [SEP]
    ids[:, 31:] = 0  # padding
    mask = (ids != 0).long()
    specials = [0, 1, 2, 3, 4]
    masked, labels = mask_tokens(ids, mask, specials, mask_id=4, vocab_size=1000, generator=generator)
    selected = labels != IGNORE
    assert not selected[:, 0].any() and not selected[:, 30:].any()  # [CLS], [SEP] and padding never selected
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])
    eligible = int(mask.sum()) - 2 * b
    n = int(selected.sum())
    assert abs(n / eligible - 0.15) < 0.01
    to_mask = (masked == 4) & selected
    changed = (masked != ids) & ~to_mask  # random replacements (a random id equal to the original counts as kept)
    kept = selected & (masked == ids)
    assert abs(int(to_mask.sum()) / n - 0.8) < 0.03
    assert abs(int(changed.sum()) / n - 0.1) < 0.02
    assert abs(int(kept.sum()) / n - 0.1) < 0.02


# ------------------------------------------------------------------------------------------------ the objective


def _objective(model, **options):
    return build_objective("albef", {"queue_size": 8, **options},
                           ObjectiveContext(model=model, total_steps=10, steps_per_epoch=2))


def _batch(model_cfg, n=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (n, 6), generator=generator)
    ids[:, 0], ids[:, -1] = 2, 3
    return {"pixels": torch.randn(n, 3, 32, 32, generator=generator), "input_ids": ids,
            "attention_mask": torch.ones_like(ids), "index": torch.arange(n)}


def test_itc_term_equals_a_direct_computation_with_the_queue_and_same_image_masking() -> None:
    torch.manual_seed(0)
    cfg = _cfg()
    model = build_model(cfg).eval()
    objective = _objective(model, itm_weight=0.0, mlm_weight=0.0)
    assert not any(p.requires_grad for p in objective.teacher.parameters())
    # fill the queue by hand: image 1's earlier features (a positive by id), and two unrelated entries
    torch.manual_seed(3)
    queue_image, queue_text = F.normalize(torch.randn(3, cfg.embed_dim), dim=-1), F.normalize(torch.randn(3, cfg.embed_dim), dim=-1)
    objective.image_queue[:3], objective.text_queue[:3] = queue_image, queue_text
    objective.id_queue[:3] = torch.tensor([1, 50, 51])
    objective.queue_filled.fill_(3)
    objective.steps_done.fill_(1)  # alpha = 0.4 * 1/2
    batch = _batch(cfg)
    with torch.no_grad():
        out = model(batch)
        terms = objective(out, batch)
        image_m, text_m = objective.teacher.encode_image(batch["pixels"]), objective.teacher.encode_text(
            batch["input_ids"], batch["attention_mask"])
    alpha = 0.2
    assert float(terms["alpha"]) == pytest.approx(alpha)
    scale = float(out["logit_scale"])
    text_cols, image_cols = torch.cat([text_m, queue_text]), torch.cat([image_m, queue_image])
    col_ids = [0, 1, 2, 3, 1, 50, 51]
    total = 0.0
    for feats, m_feats, cols in ((out["image_features"], image_m, text_cols), (out["text_features"], text_m, image_cols)):
        for i in range(4):
            student = [scale * float(feats[i] @ cols[j]) for j in range(7)]
            teacher = [scale * float(m_feats[i] @ cols[j]) for j in range(7)]
            pos = [float(col_ids[j] == i) for j in range(7)]
            lse_s = math.log(sum(math.exp(v) for v in student))
            z_t = sum(math.exp(v) for v in teacher)
            for j in range(7):
                target = alpha * math.exp(teacher[j]) / z_t + (1 - alpha) * pos[j] / sum(pos)
                total -= target * (student[j] - lse_s) / 4
    assert float(terms["itc"]) == pytest.approx(total / 2, rel=1e-4)
    assert set(terms) == {"loss", "itc", "alpha"}


def test_after_step_updates_the_teacher_by_ema_and_enqueues_the_momentum_features() -> None:
    torch.manual_seed(0)
    cfg = _cfg()
    model = build_model(cfg)
    objective = _objective(model, momentum=0.9)
    batch = _batch(cfg)
    objective(model(batch), batch)["loss"].backward()
    with torch.no_grad():
        image_m = objective.teacher.encode_image(batch["pixels"])
    before = {n: p.detach().clone() for n, p in objective.teacher.named_parameters()}
    optimizer = build_optimizer(model, 1e-2, 0.0)
    optimizer.step()
    objective.after_step(model, 1)
    student = dict(model.named_parameters())
    moved = 0
    for name, param in objective.teacher.named_parameters():
        assert torch.allclose(param, 0.9 * before[name] + 0.1 * student[name].detach(), atol=1e-6), name
        moved += not torch.equal(param, before[name])
    assert moved > 10
    assert int(objective.queue_ptr) == 4 and int(objective.queue_filled) == 4 and int(objective.steps_done) == 1
    assert torch.allclose(objective.image_queue[:4], image_m, atol=1e-6)
    assert objective.id_queue.tolist()[:5] == [0, 1, 2, 3, -1]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in in_optimizer for p in objective.teacher.parameters())
    assert not any(k.startswith("teacher") or "queue" in k for k in model.state_dict())  # the model stays the student


def test_options_needing_the_fusion_arch_are_refused_on_the_dual_encoder() -> None:
    model = build_model(get_model_config("tiny-vit-bert", **TINY))
    with pytest.raises(ConfigError, match="itm_weight > 0 need arch fusion"):
        _objective(model)
    objective = _objective(model, itm_weight=0.0, mlm_weight=0.0)  # ITC + momentum distillation works on any arch
    batch = _batch(None)
    assert set(objective(model(batch), batch)) == {"loss", "itc", "alpha"}
    with pytest.raises(ConfigError, match="lm_weight > 0 needs the caption decoder"):
        _objective(build_model(_cfg(arch_options={"decoder_layers": 0})), lm_weight=1.0)
    with pytest.raises(ConfigError, match="momentum"):
        _objective(model, momentum=1.5)


def test_every_term_is_logged_and_the_stage_resumes_exactly(tmp_path, manifest) -> None:
    stage = _stage(max_steps=4, checkpoint_every=2)
    cfg = _cfg()
    reference = train_stage(cfg, stage, manifest, None, CheckpointStore(tmp_path / "ref"))
    assert {"loss", "itc", "itm", "itm_accuracy", "mlm", "lm", "alpha"} <= set(reference["history"][0])
    assert [h["alpha"] for h in reference["history"]] == pytest.approx([0.0, 0.2, 0.4, 0.4])  # 2 steps per epoch
    objective = reference["objective"]
    assert int(objective["queue_filled"]) == 12 and int(objective["queue_ptr"]) == 32 % 12
    assert any(k.startswith("teacher.") for k in objective) and not any(k.startswith("teacher.") for k in reference["model"])

    class Crash:
        def on_step(self, step, metrics):
            if step == 3:
                raise KeyboardInterrupt

        def on_checkpoint(self, path, step):
            pass

    store = CheckpointStore(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        train_stage(cfg, stage, manifest, None, store, [Crash()])
    assert load_checkpoint(store.latest())["step"] == 2
    resumed = train_stage(cfg, stage, manifest, None, store)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in reference["history"]]
    for part in ("model", "objective"):
        for key, value in reference[part].items():
            assert torch.equal(resumed[part][key], value), (part, key)


def test_albef_stage_with_frozen_towers_keeps_them_and_their_teacher(tmp_path, manifest) -> None:
    stage = _stage(trainable=["image_proj", "text_proj", "logit_scale"], objective_options={
        "queue_size": 16, "itm_weight": 0.0, "mlm_weight": 0.0, "momentum": 0.5})
    torch.manual_seed(0)
    initial = build_model(_cfg()).state_dict()
    final = train_stage(_cfg(), stage, manifest, None, CheckpointStore(tmp_path / "s1"))
    for key, value in final["model"].items():
        assert torch.equal(value, initial[key]) == (not key.startswith(("image_proj", "text_proj", "logit_scale"))), key
    teacher = {k[len("teacher."):]: v for k, v in final["objective"].items() if k.startswith("teacher.")}
    assert torch.equal(teacher["image_tower.patch_embed.proj.weight"], initial["image_tower.patch_embed.proj.weight"])
    assert not torch.equal(teacher["image_proj.weight"], initial["image_proj.weight"])
    set_trainable(model := build_model(_cfg()), ["all"])
    assert not any(n.startswith("teacher") for n, _ in model.named_parameters())
