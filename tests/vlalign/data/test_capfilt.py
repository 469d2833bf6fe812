"""CapFilt: captions sampled for every image, original and synthetic pairs scored by ITM and filtered, the report
counts both origins and shows kept and dropped examples with thumbnails."""

from __future__ import annotations

import re

import pytest
import torch

from vlalign.data.capfilt import (
    CapFiltConfig, caption_lang, caption_text, capfilt_html, capfilt_report, effective_threshold, filtered_manifest,
    run_capfilt,
)
from vlalign.errors import ConfigError
from vlalign.models import build_model, build_tokenizer_for, get_model_config

from shared import TINY, make_manifest


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    torch.manual_seed(0)
    cfg = get_model_config("tiny-vit-bert", **TINY, arch="fusion", arch_options={"fusion_layers": 1, "decoder_layers": 1})
    model = build_model(cfg)
    rows = make_manifest(tmp_path_factory.mktemp("capfilt") / "images")
    rows = rows[rows["split"] == "train"]
    config = CapFiltConfig(synthetic_per_image=2, max_length=8, min_length=2, batch_size=5, examples=3)
    return rows, config, run_capfilt(model, cfg, rows, config), cfg


def test_every_original_and_synthetic_pair_is_scored(scored) -> None:
    rows, config, result, cfg = scored
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
    _, config, result, _ = scored
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


def test_quantile_threshold_and_config_errors() -> None:
    import pandas as pd

    scores = pd.Series([0.1, 0.2, 0.3, 0.4, 0.5])
    assert effective_threshold(scores, CapFiltConfig(drop_quantile=0.5)) == pytest.approx(0.3)
    assert effective_threshold(scores, CapFiltConfig(threshold=0.25)) == 0.25
    with pytest.raises(ConfigError, match="capfilt.top_p"):
        CapFiltConfig(top_p=0.0)
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
