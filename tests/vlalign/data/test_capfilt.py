"""CapFilt: captions sampled for every image, original and synthetic pairs scored by ITM and filtered, the report
counts both origins and shows kept and dropped examples with thumbnails."""

from __future__ import annotations

import re

import pytest
import torch

from vlalign.data.capfilt import (
    CapFiltConfig, calibrate, caption_lang, caption_text, capfilt_html, capfilt_report, effective_threshold,
    filtered_manifest, run_capfilt,
)
from vlalign.errors import ConfigError, DatasetFormatError
from vlalign.models import build_model, build_tokenizer_for, get_model_config

from shared import TINY, make_manifest


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    torch.manual_seed(0)
    cfg = get_model_config("tiny-vit-bert", **TINY, arch="fusion", arch_options={"fusion_layers": 1, "decoder_layers": 1})
    model = build_model(cfg)
    rows = make_manifest(tmp_path_factory.mktemp("capfilt") / "images")
    rows = rows[rows["split"] == "train"]
    config = CapFiltConfig(synthetic_per_image=2, max_length=8, min_length=2, batch_size=5, examples=3,
                           calibration="none", keep_best_per_image=False)  # BLIP's filter: a fixed 0.5
    return rows, config, run_capfilt(model, cfg, rows, config), cfg, model


def test_every_original_and_synthetic_pair_is_scored(scored) -> None:
    rows, config, result, cfg, _ = scored
    original = result[result["capfilt_origin"] == "original"]
    synthetic = result[result["capfilt_origin"] == "synthetic"]
    assert len(original) == len(rows) and set(original["caption_id"]) == set(rows["caption_id"])
    assert 0 < len(synthetic) <= 2 * 16 and synthetic.groupby("image_id").size().max() <= 2
    assert set(synthetic["image_id"]) <= set(rows["image_id"])
    assert synthetic["caption_id"].str.startswith("capfilt:").all() and (synthetic["split"] == "train").all()
    assert ((result["itm_score"] > 0) & (result["itm_score"] < 1)).all()
    assert (result["kept"] == (result["itm_score"] >= 0.5)).all()
    tokenizer = build_tokenizer_for(cfg)
    for caption, lang in zip(synthetic["caption"], synthetic["lang"]):  # real text the tokenizer reads back
        assert caption and lang == caption_lang(caption)
        assert tokenizer.unk_token_id not in tokenizer(caption)["input_ids"]


def test_filter_report_and_html(scored) -> None:
    _, config, result, _, _ = scored
    threshold = float(result["itm_score"].median())  # a threshold that keeps some pairs and drops others
    config = CapFiltConfig(**{**config.__dict__, "threshold": threshold})
    result = result.assign(kept=result["itm_score"] >= threshold)
    kept = filtered_manifest(result, config)
    assert len(kept) == int(result["kept"].sum()) and (kept["itm_score"] >= threshold).all() and "kept" not in kept
    report = capfilt_report(result, config)
    assert report["pairs"] == len(result) and report["pairs_kept"] == len(kept)
    for origin in ("original", "synthetic"):
        stats = report["per_origin"][origin]
        part = result[result["capfilt_origin"] == origin]
        assert (stats["pairs"], stats["kept"], stats["dropped"]) == (len(part), int(part["kept"].sum()),
                                                                       int((~part["kept"]).sum()))
        for label in ("kept", "dropped"):
            assert len(stats["examples"][label]) == min(3, stats[label])
            assert all((e["itm_score"] >= threshold) == (label == "kept") for e in stats["examples"][label])
    page = capfilt_html(report)
    shown = sum(len(s["examples"][label]) for s in report["per_origin"].values() for label in ("kept", "dropped"))
    assert page.count('<tr class="kept">') + page.count('<tr class="dropped">') == shown
    assert page.count('<tr class="kept">') > 0 and page.count('<tr class="dropped">') > 0
    assert len(re.findall(r'src="data:image/png;base64,[A-Za-z0-9+/=]+"', page)) == shown
    with pytest.raises(ConfigError, match="kept no pair"):
        filtered_manifest(result.assign(kept=False), config)


def test_calibrated_threshold_keeps_the_asked_fraction_of_validation_pairs(scored) -> None:
    """calibration: validation cuts at the score that keeps keep_validation of the validation pairs (scored by the
    same head, original captions only), whatever the head's prior; the training pairs are then cut there."""
    rows, fixed, _, cfg, model = scored
    config = CapFiltConfig(**{**fixed.__dict__, "calibration": "validation", "keep_validation": 0.75})
    validation = rows.iloc[: 24].assign(split="val")  # stands in for a val split: true pairs of 8 images
    calibration = calibrate(model, cfg, validation, config)
    own = run_capfilt(model, cfg, validation, CapFiltConfig(**{**config.__dict__, "synthetic_per_image": 0}), calibration)
    assert calibration["pairs"] == len(validation) == len(own)
    assert calibration["kept_fraction"] == pytest.approx((own["itm_score"] >= calibration["threshold"]).mean())
    assert 0.75 <= calibration["kept_fraction"] < 0.75 + 2 / len(validation)  # keeps the fraction asked, no more
    assert calibration["threshold"] in set(own["itm_score"])  # a score of a validation pair (the lower quantile)
    result = run_capfilt(model, cfg, rows, config, calibration)
    assert (result["kept"] == (result["itm_score"] >= calibration["threshold"])).all()
    report = capfilt_report(result, config, calibration)
    assert report["threshold"] == calibration["threshold"] and report["calibration"] == calibration
    assert "calibrated: it keeps" in capfilt_html(report)
    with pytest.raises(ConfigError, match="needs the calibration"):
        run_capfilt(model, cfg, rows, config)
    with pytest.raises(DatasetFormatError, match="split == 'val'"):
        calibrate(model, cfg, validation.iloc[:0], config)
    assert calibrate(model, cfg, validation, fixed) is None  # calibration: none -> the fixed threshold


def test_keep_best_per_image_leaves_no_image_without_a_caption(scored) -> None:
    rows, fixed, _, cfg, model = scored
    strict = {**fixed.__dict__, "threshold": 0.999, "synthetic_per_image": 1}  # drops (nearly) every pair
    without = run_capfilt(model, cfg, rows, CapFiltConfig(**strict))
    assert not without["rescued"].any()
    assert without.groupby("image_id")["kept"].any().sum() < rows["image_id"].nunique()  # images lost
    result = run_capfilt(model, cfg, rows, CapFiltConfig(**{**strict, "keep_best_per_image": True}))
    assert result.groupby("image_id")["kept"].any().all()  # every image keeps a caption
    for image_id, group in result.groupby("image_id"):
        if not without.loc[group.index, "kept"].any():  # it had lost all: now exactly its best-scoring pair
            assert group["kept"].sum() == 1 and group.loc[group["kept"], "itm_score"].item() == group["itm_score"].max()
            assert group.loc[group["kept"], "rescued"].all()
        else:
            assert (group["kept"] == without.loc[group.index, "kept"]).all() and not group["rescued"].any()
    report = capfilt_report(result, CapFiltConfig(**{**strict, "keep_best_per_image": True}))
    assert report["images_without_caption"] == 0 and report["images_rescued"] == int(result["rescued"].sum()) > 0


def test_quantile_threshold_and_config_errors() -> None:
    import pandas as pd

    scores = pd.Series([0.1, 0.2, 0.3, 0.4, 0.5])
    assert effective_threshold(scores, CapFiltConfig(drop_quantile=0.5)) == pytest.approx(0.3)
    assert effective_threshold(scores, CapFiltConfig(threshold=0.25)) == 0.25
    with pytest.raises(ConfigError, match="capfilt.top_p"):
        CapFiltConfig(top_p=0.0)
    with pytest.raises(ConfigError, match=r"capfilt.calibration='train'.*\['validation', 'none'\]"):
        CapFiltConfig(calibration="train")
    with pytest.raises(ConfigError, match="capfilt.keep_validation"):
        CapFiltConfig(keep_validation=0.0)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['treshold'\]"):
        CapFiltConfig.from_dict({"treshold": 0.5})


def test_caption_text_joins_wordpieces_and_chinese() -> None:
    tokenizer = build_tokenizer_for(get_model_config("tiny-vit-bert"))
    ids = tokenizer("a red circle", add_special_tokens=True)["input_ids"]
    assert caption_text(tokenizer, ids) == "a red circle" and caption_lang("a red circle") == "en"
    zh = tokenizer("红色圆形", add_special_tokens=True)["input_ids"]
    assert caption_text(tokenizer, zh) == "红色圆形" and caption_lang("红色圆形") == "zh"


def test_blip_captioner_writes_the_synthetic_training_set(tmp_path) -> None:
    """SPHINX's synthetic captions from a trained BLIP captioner (a `blip` stage's checkpoint), not templates."""
    from vlalign.data.synthetic import CaptionerContext, SyntheticConfig, synthetic_captions
    from vlalign.train import CheckpointStore, StageConfig, train_stage

    cfg = get_model_config("tiny-vit-bert", **TINY, arch="fusion", arch_options={"fusion_layers": 1, "decoder_layers": 1,
                                                                                 "mlm_head": False})
    rows = make_manifest(tmp_path / "images")
    rows = rows[rows["split"] == "train"].reset_index(drop=True)
    stage = StageConfig(name="blip", max_steps=2, batch_size=8, warmup_steps=1, checkpoint_every=0, objective="blip",
                        objective_options={"queue_size": 16}, device="cpu")
    final = train_stage(cfg, stage, rows, None, CheckpointStore(tmp_path / "blip"))
    config = SyntheticConfig(captioner="blip", options={"captions_per_image": 2, "max_length": 8, "min_length": 2,
                                                        "batch_size": 5}, seed=3)
    out = synthetic_captions(rows, config, CaptionerContext(checkpoint=final))
    assert list(out.columns) == list(rows.columns) and 0 < len(out) <= 2 * rows["image_id"].nunique()
    assert out["caption_id"].str.startswith("syn:").all() and out["source"].str.startswith("synthetic:blip:").all()
    assert set(out["image_id"]) <= set(rows["image_id"]) and (out["split"] == "train").all()
    assert set(out["caption"]).isdisjoint(rows["caption"]) and (out["caption"].str.len() > 0).all()
    assert (out["lang"] == out["caption"].map(caption_lang)).all()
    again = synthetic_captions(rows, config, CaptionerContext(checkpoint=final))
    assert again["caption"].tolist() == out["caption"].tolist()  # seeded sampling
    dual = train_stage(get_model_config("tiny-vit-bert", **TINY), StageConfig(name="dual", max_steps=1, batch_size=8,
                       checkpoint_every=0, device="cpu"), rows, None, CheckpointStore(tmp_path / "dual"))
    with pytest.raises(ConfigError, match="has no caption decoder; use a checkpoint of the blip recipe"):
        synthetic_captions(rows, config, CaptionerContext(checkpoint=dual))
