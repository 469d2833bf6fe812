"""ALBEF / BLIP objectives: each formula against a direct implementation, and the objective in the real loop
(teacher never in the optimizer, queues and teacher checkpointed and resumed exactly).

Each reference convention (docs/conventions.md) is an option; its test writes the reference code's rule out by hand
(ALBEF ``models/model_pretrain.py`` / ``Pretrain.py``, BLIP ``models/blip_pretrain.py`` / ``pretrain.py`` and the
retrieval fine-tuning's ``blip_retrieval.py``) and compares the objective with it."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from vlalign.errors import ConfigError
from vlalign.models import build_model, get_model_config
from vlalign.models.towers import build_tokenizer_for
from vlalign.objectives import ObjectiveContext, build_objective
from vlalign.objectives.albef import (
    IGNORE, AlbefOptions, BlipOptions, distillation_targets, ema_update, enqueue, mask_tokens, negative_weights,
    positive_mask, ramped_alpha, random_queue, sample_negatives, soft_cross_entropy,
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


def _albef_pretraining_targets(row_ids: torch.Tensor, col_ids: torch.Tensor) -> torch.Tensor:
    """ALBEF/BLIP pre-training: ``sim_targets = zeros(B, B + Q); sim_targets.fill_diagonal_(1)`` (ids unused)."""
    sim_targets = torch.zeros(row_ids.shape[0], col_ids.shape[0])
    sim_targets.fill_diagonal_(1)
    return sim_targets


def _retrieval_targets(row_ids: torch.Tensor, col_ids: torch.Tensor) -> torch.Tensor:
    """ALBEF/BLIP retrieval fine-tuning: ``pos_idx = eq(idx, idx_all); sim_targets = pos_idx / pos_idx.sum(1)``."""
    pos_idx = torch.eq(row_ids.view(-1, 1), col_ids.view(1, -1)).float()
    return pos_idx / pos_idx.sum(1, keepdim=True)


@pytest.mark.parametrize(("options", "reference"), [
    ({}, _albef_pretraining_targets),  # the default: ALBEF pre-training, random queue, no same-image masking
    ({"mask_same_image": True, "queue_init": "empty"}, _retrieval_targets),
], ids=["albef_pretraining", "same_image_masked"])
def test_itc_term_equals_the_reference_with_the_queue(options, reference) -> None:
    torch.manual_seed(0)
    cfg = _cfg()
    model = build_model(cfg).eval()
    objective = _objective(model, itm_weight=0.0, mlm_weight=0.0, **options)
    assert not any(p.requires_grad for p in objective.teacher.parameters())
    # the first queue slots by hand: image 1's earlier features (a positive by id when masked), two unrelated entries
    torch.manual_seed(3)
    queue_image, queue_text = F.normalize(torch.randn(3, cfg.embed_dim), dim=-1), F.normalize(torch.randn(3, cfg.embed_dim), dim=-1)
    objective.image_queue[:3], objective.text_queue[:3] = queue_image, queue_text
    objective.id_queue[:3] = torch.tensor([1, 50, 51])
    if options.get("queue_init") == "empty":
        objective.queue_filled.fill_(3)
    filled = int(objective.queue_filled)  # 8 with the random queue: 3 entries by hand, 5 random unit vectors
    objective.steps_done.fill_(1)  # alpha = 0.4 * 1/2
    batch = _batch(cfg)
    with torch.no_grad():
        out = model(batch)
        terms = objective(out, batch)
        image_m, text_m = objective.teacher.encode_image(batch["pixels"]), objective.teacher.encode_text(
            batch["input_ids"], batch["attention_mask"])
    alpha = 0.2
    assert float(terms["alpha"]) == pytest.approx(alpha)
    # the reference: columns (D, B + Q), temp = 1 / scale, targets mixed with the teacher's softmax
    temp = 1.0 / out["logit_scale"]
    image_feat_all = torch.cat([image_m.t(), objective.image_queue[:filled].t()], dim=1)
    text_feat_all = torch.cat([text_m.t(), objective.text_queue[:filled].t()], dim=1)
    idx_all = torch.cat([batch["index"], objective.id_queue[:filled]])
    sim_targets = reference(batch["index"], idx_all)
    if options:
        assert sim_targets[1, 4] == 0.5  # image 1's queued caption is a positive
    else:
        assert sim_targets[1, 4] == 0.0 and filled == 8  # a negative, and the random entries are columns too
    sim_i2t_targets = alpha * F.softmax(image_m @ text_feat_all / temp, dim=1) + (1 - alpha) * sim_targets
    sim_t2i_targets = alpha * F.softmax(text_m @ image_feat_all / temp, dim=1) + (1 - alpha) * sim_targets
    sim_i2t = out["image_features"] @ text_feat_all / temp
    sim_t2i = out["text_features"] @ image_feat_all / temp
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
    # fp32, the same terms summed in another order: rounding ~1e-6 relative, far below the 0.5/4 a target moves
    assert float(terms["itc"]) == pytest.approx(float((loss_i2t + loss_t2i) / 2), rel=1e-5)
    assert set(terms) == {"loss", "itc", "alpha"}


def test_after_step_updates_the_teacher_by_ema_and_enqueues_the_momentum_features() -> None:
    torch.manual_seed(0)
    cfg = _cfg()
    model = build_model(cfg)
    objective = _objective(model, momentum=0.9, queue_init="empty")
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
    with pytest.raises(ConfigError, match=r"objective_options.itm_negatives must be teacher or student \(got 'both'\)"):
        _objective(model, itm_weight=0.0, mlm_weight=0.0, itm_negatives="both")
    with pytest.raises(ConfigError, match="objective_options.queue_init must be random or empty"):
        _objective(model, itm_weight=0.0, mlm_weight=0.0, queue_init="zeros")
    with pytest.raises(ConfigError, match="objective_options.negative_weight_floor must be >= 0"):
        _objective(model, itm_weight=0.0, mlm_weight=0.0, negative_weight_floor=-1e-4)


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


# ------------------------------------------------------------------------------------------------ reference conventions


def test_defaults_are_the_papers_pretraining_choices() -> None:
    albef, blip = AlbefOptions(), BlipOptions()
    assert (albef.itm_negatives, albef.negative_weight_floor, albef.mask_same_image, albef.mlm_mask_sep,
            albef.alpha_ramp_epochs, albef.queue_init) == ("teacher", 0.0, False, True, 1.0, "random")
    assert (blip.itm_negatives, blip.negative_weight_floor, blip.mask_same_image, blip.alpha_ramp_epochs,
            blip.queue_init) == ("teacher", 1e-4, False, 2.0, "random")


def _perturbed_student(objective, model) -> None:
    """Move the student away from its teacher (a copy at construction), so student x teacher != student x student."""
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    assert not torch.equal(objective.teacher.image_proj.weight, model.image_proj.weight)


def _albef_pretraining_weights(image_feat, text_feat, image_feat_m, text_feat_m, queue, temp, idx, floor):
    """ALBEF model_pretrain.py (floor 0) / BLIP blip_pretrain.py (floor 1e-4): student rows against the momentum
    features ``*_feat_all = cat([feat_m.t(), queue])``, the batch columns ``[:, :bs]``, the diagonal set to 0."""
    bs = image_feat.shape[0]
    text_feat_all = torch.cat([text_feat_m.t(), queue.t()], dim=1)
    image_feat_all = torch.cat([image_feat_m.t(), queue.t()], dim=1)
    sim_i2t = image_feat @ text_feat_all / temp
    sim_t2i = text_feat @ image_feat_all / temp
    weights_i2t = F.softmax(sim_i2t[:, :bs], dim=1) + floor
    weights_t2i = F.softmax(sim_t2i[:, :bs], dim=1) + floor
    weights_i2t.fill_diagonal_(0)
    weights_t2i.fill_diagonal_(0)
    return weights_i2t, weights_t2i


def _blip_retrieval_weights(image_feat, text_feat, image_feat_m, text_feat_m, queue, temp, idx, floor):
    """BLIP blip_retrieval.py (negative_all_rank false): student x student, every caption of the same image 0."""
    mask = torch.eq(idx.view(-1, 1), idx.view(1, -1))
    weights_i2t = F.softmax(image_feat @ text_feat.t() / temp, dim=1)
    weights_i2t.masked_fill_(mask, 0)
    weights_t2i = F.softmax(text_feat @ image_feat.t() / temp, dim=1)
    weights_t2i.masked_fill_(mask, 0)
    return weights_i2t, weights_t2i


@pytest.mark.parametrize(("objective_name", "options", "index", "reference", "floor"), [
    ("albef", {}, [0, 1, 2, 3], _albef_pretraining_weights, 0.0),  # the default: student x teacher
    ("blip", {}, [0, 1, 2, 3], _albef_pretraining_weights, 1e-4),  # BLIP pre-training: the same plus the floor
    ("albef", {"itm_negatives": "student"}, [0, 1, 1, 2], _blip_retrieval_weights, 0.0),  # two captions of image 1
], ids=["albef_teacher", "blip_teacher_floor", "student"])
def test_itm_negative_weights_equal_the_reference(objective_name, options, index, reference, floor) -> None:
    torch.manual_seed(0)
    cfg = _cfg()
    model = build_model(cfg).eval()
    objective = build_objective(objective_name, {"queue_size": 8, "mlm_weight": 0.0, **options},
                                ObjectiveContext(model=model, total_steps=10, steps_per_epoch=2))
    _perturbed_student(objective, model)
    batch = {**_batch(cfg), "index": torch.tensor(index)}
    with torch.no_grad():
        out = model(batch)
        image_m = objective.teacher.encode_image(batch["pixels"])  # (B, D) the momentum features
        text_m = objective.teacher.encode_text(batch["input_ids"], batch["attention_mask"])
        got = objective.itm_negative_weights(out, image_m, text_m, batch["index"])
        want = reference(out["image_features"], out["text_features"], image_m, text_m, objective.image_queue,
                         1.0 / out["logit_scale"], batch["index"], floor)
        other = objective.itm_negative_weights(  # the other convention on the same features, to show the test can fail
            out, out["image_features"], out["text_features"], batch["index"]) if not options else None
    for ours, theirs in zip(got, want):  # (B, B) each; the draw is ∝ weights, so compare the rows normalised
        assert torch.equal(ours == 0, theirs == 0)
        # fp32 softmax of logits (|logit| <= scale ~ 14) computed in another order: ~1e-6 relative
        assert torch.allclose(ours / ours.sum(1, keepdim=True), theirs / theirs.sum(1, keepdim=True), atol=1e-5)
    if other is not None:
        assert (got[0] / got[0].sum(1, keepdim=True) - other[0] / other[0].sum(1, keepdim=True)).abs().max() > 1e-3


def test_same_text_positive_never_draws_an_identical_caption_as_negative() -> None:
    """itm_same_text_positive: a caption word for word equal to the row's own is a false negative (templated and web
    corpora repeat captions across images): weight 0 both ways, every other weight as without the option, and the
    objective's ITM draws never pick it."""
    torch.manual_seed(0)
    cfg = _cfg()
    model = build_model(cfg).eval()
    batch = {**_batch(cfg), "index": torch.tensor([0, 1, 2, 3])}
    batch["input_ids"][2] = batch["input_ids"][0]  # image 2's caption is image 0's caption, token for token
    batch["attention_mask"][2] = batch["attention_mask"][0]
    same = (batch["input_ids"][:, None] == batch["input_ids"][None]).all(dim=2)
    assert same[0, 2] and same[2, 0] and int(same.sum()) == 6  # the diagonal and the duplicated pair
    objective = build_objective("albef", {"queue_size": 8, "mlm_weight": 0.0, "itm_same_text_positive": True},
                                ObjectiveContext(model=model, total_steps=10, steps_per_epoch=2))
    with torch.no_grad():
        out = model(batch)
        image_m = objective.teacher.encode_image(batch["pixels"])
        text_m = objective.teacher.encode_text(batch["input_ids"], batch["attention_mask"])
        plain = objective.itm_negative_weights(out, image_m, text_m, batch["index"])
        masked = objective.itm_negative_weights(out, image_m, text_m, batch["index"], same)
    for before, after in zip(plain, masked):
        assert before[0, 2] > 0 and before[2, 0] > 0  # without the option the duplicate is a candidate negative
        assert after[0, 2] == 0 and after[2, 0] == 0
        keep = ~same
        assert torch.equal(after[keep], before[keep])  # nothing else changes
    model.train()
    objective.train()
    drawn = []
    original = objective.itm_negative_weights
    objective.itm_negative_weights = lambda *a: drawn.append(original(*a)) or drawn[-1]
    objective(model(batch), batch)  # the forward builds `same` from the batch's tokens itself
    assert drawn and all(w[0, 2] == 0 and w[2, 0] == 0 for w in drawn[-1])


def test_blip_floor_makes_a_well_separated_row_near_uniform() -> None:
    """BLIP: ``softmax(sim) + 1e-4``, positives 0. Once a row is well separated the floor dominates the draw."""
    sim = torch.zeros(2, 64)
    sim[0, 0], sim[0, 1] = 40.0, 25.0  # row 0: its own caption far ahead, caption 1 the hardest negative
    sim[1] = torch.linspace(0.0, 3.0, 64)
    positives = torch.eye(2, 64, dtype=torch.bool)
    reference = F.softmax(sim, dim=1) + 1e-4
    reference[:, :2].fill_diagonal_(0)
    got = negative_weights(sim, positives, floor=1e-4)
    assert torch.allclose(got / got.sum(1, keepdim=True), reference / reference.sum(1, keepdim=True), atol=1e-7)
    hardest = float(got[0, 1] / got[0].sum())  # (e^-15 + 1e-4) / (63e-4 + ...) ~ 1/63
    without = negative_weights(sim, positives)
    assert hardest == pytest.approx(1 / 63, rel=0.01)
    assert float(without[0, 1] / without[0].sum()) > 0.99  # without the floor: almost always the hardest


def test_mlm_selection_follows_albefs_rule_with_mlm_mask_sep() -> None:
    """ALBEF's ``mask``: ``masked_indices = bernoulli(p)``, then False at [PAD] and [CLS] only; [SEP] (and [UNK])
    may be selected. ``mlm_mask_sep: false`` selects no special token."""
    model = build_model(_cfg())
    tokenizer = build_tokenizer_for(model.config)
    pad, cls, sep, unk = tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.unk_token_id
    rows, length = 1000, 10
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 40, (rows, length), generator=generator)
    ids[:, 0], ids[:, 3], ids[:, 7], ids[:, 8:] = cls, unk, sep, pad
    attention = (ids != pad).long()
    reference_eligible = (ids != pad) & (ids != cls)  # ALBEF: masked_indices[pad] = masked_indices[cls] = False
    rates = {}
    for mask_sep in (True, False):
        objective = _objective(model, itm_weight=0.0, mlm_mask_sep=mask_sep)
        masked, labels = mask_tokens(ids, attention, objective.mlm_excluded_ids, objective.mask_id,
                                     objective.vocab_size, generator=generator)
        selected = labels != IGNORE  # (rows, L)
        rates[mask_sep] = selected.float().mean(0)  # (L,) selection rate per position
        assert not (selected & ~reference_eligible).any()  # never outside ALBEF's eligible set
    # with the option every position ALBEF may mask is selected at p = 0.15 (binomial sd 0.011 over 1000 rows)
    assert torch.allclose(rates[True][reference_eligible[0]], torch.full((7,), 0.15), atol=0.05)
    assert float(rates[False][7]) == 0.0 and float(rates[False][3]) == 0.0  # [SEP] and [UNK] never without it
    assert abs(float(rates[False][1:7].sum() - rates[False][3]) / 5 - 0.15) < 0.05


@pytest.mark.parametrize("objective_name", ["albef", "blip"])
def test_alpha_ramp_equals_the_reference_schedule(objective_name) -> None:
    """ALBEF Pretrain.py: ``alpha if epoch > 0 else alpha * min(1, i / len(loader))``; BLIP pretrain.py:
    ``alpha * min(1, (epoch * len(loader) + i) / (2 * len(loader)))``."""
    length, alpha = 3, 0.4
    model = build_model(_cfg())
    objective = build_objective(objective_name, {"queue_size": 8, "mlm_weight": 0.0},
                                ObjectiveContext(model=model, total_steps=12, steps_per_epoch=length))
    for step in range(12):
        epoch, i = divmod(step, length)
        if objective_name == "albef":
            want = alpha if epoch > 0 else alpha * min(1, i / length)
        else:
            want = alpha * min(1, (epoch * length + i) / (2 * length))
        objective.steps_done.fill_(step)
        assert objective.alpha() == pytest.approx(want, abs=1e-12), step


def test_queue_starts_random_and_normalised_or_empty() -> None:
    """ALBEF/BLIP ``__init__``: ``image_queue = normalize(randn(embed_dim, queue_size), dim=0)``, then the text
    queue the same way; here drawn from a generator seeded with the stage's seed, so every rank holds the same."""
    model = build_model(_cfg())
    dim, size = model.config.embed_dim, 8
    torch.manual_seed(7)
    objective = _objective(model, queue_size=size)
    generator = torch.Generator().manual_seed(7)
    image_queue = torch.nn.functional.normalize(torch.randn(dim, size, generator=generator), dim=0)  # (D, Q)
    text_queue = torch.nn.functional.normalize(torch.randn(dim, size, generator=generator), dim=0)  # (D, Q)
    assert torch.allclose(objective.image_queue, image_queue.t(), atol=1e-7)  # stored as rows (Q, D)
    assert torch.allclose(objective.text_queue, text_queue.t(), atol=1e-7)
    assert torch.allclose(random_queue(size, dim, torch.Generator().manual_seed(7)), image_queue.t(), atol=1e-7)
    assert int(objective.queue_filled) == size and (objective.id_queue == -1).all()  # every column, never positive
    assert torch.allclose(objective.image_queue.norm(dim=1), torch.ones(size), atol=1e-6)
    empty = _objective(model, queue_size=size, queue_init="empty")
    assert int(empty.queue_filled) == 0 and not empty.image_queue.any()
    image, text, ids = empty.queue_columns()
    assert image.shape == (0, dim) and text.shape == (0, dim) and ids.shape == (0,)
