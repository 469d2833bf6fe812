"""Synthetic captions: the template captioner (ground-truth attributes, a terse style, captioner mistakes at a set
rate), the caption mixture, the captioner registry (the hook for model captioners) and its errors."""

from __future__ import annotations

import pandas as pd
import pytest

from vlalign.data.demo import DemoConfig, generate_demo_dataset
from vlalign.data.formats import load_karpathy
from vlalign.data.synthetic import (
    CaptionerContext, SyntheticConfig, attributes_by_file, list_captioners, register_captioner, synthetic_captions,
)
from vlalign.errors import ConfigError, DatasetFormatError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = generate_demo_dataset(tmp_path_factory.mktemp("demo") / "d", DemoConfig(n_train=30, n_val=2, n_test=2,
                                                                                    zero_shot_per_class=1))
    flickr = root / "flickr_demo"
    rows = pd.concat([load_karpathy(flickr / "dataset_demo.json", flickr / "images", "en"),
                      load_karpathy(flickr / "dataset_demo_zh.json", flickr / "images", "zh")])
    import json

    karpathy = json.loads((flickr / "dataset_demo.json").read_text(encoding="utf-8"))
    return rows[rows["split"] == "train"].reset_index(drop=True), attributes_by_file(karpathy)


def test_template_captions_follow_the_attributes(corpus) -> None:
    rows, attributes = corpus
    out = synthetic_captions(rows, SyntheticConfig(options={"captions_per_image": 3, "error_rate": 0.0}),
                             CaptionerContext(attributes=attributes))
    assert list(out.columns) == list(rows.columns)
    assert len(out) == 3 * rows.drop_duplicates(["image_id", "lang"]).shape[0]  # 3 per image and language
    assert set(out["image_id"]) == set(rows["image_id"]) and set(out["split"]) == {"train"}
    assert out["caption_id"].str.startswith("syn:").all() and out["source"].str.startswith("synthetic:template:").all()
    assert not set(out["caption"]) & set(rows["caption"])  # a style no real caption has
    for row in out[out["lang"] == "en"].itertuples():
        truth = attributes[row.image_path.split("/")[-1]]
        assert row.caption.startswith("a photo of") and truth["colour"] in row.caption and truth["shape"] in row.caption


def test_error_rate_makes_captioner_mistakes(corpus) -> None:
    rows, attributes = corpus
    clean = synthetic_captions(rows, SyntheticConfig(options={"captions_per_image": 4, "error_rate": 0.0}),
                               CaptionerContext(attributes=attributes))
    noisy = synthetic_captions(rows, SyntheticConfig(options={"captions_per_image": 4, "error_rate": 0.5}),
                               CaptionerContext(attributes=attributes))
    always = synthetic_captions(rows, SyntheticConfig(options={"captions_per_image": 4, "error_rate": 1.0}),
                                CaptionerContext(attributes=attributes))

    def wrong(frame: pd.DataFrame) -> float:
        en = frame[frame["lang"] == "en"]
        bad = [not (attributes[p.split("/")[-1]]["colour"] in c and attributes[p.split("/")[-1]]["shape"] in c)
               for p, c in zip(en["image_path"], en["caption"])]
        return sum(bad) / len(bad)

    assert wrong(clean) == 0.0
    assert wrong(always) > wrong(noisy) > 0.0  # colour or shape is the wrong attribute in 2 of 5 (or 6) mistakes
    again = synthetic_captions(rows, SyntheticConfig(options={"captions_per_image": 4, "error_rate": 0.5}),
                               CaptionerContext(attributes=attributes))
    assert again.equals(noisy)  # seeded


def test_include_real_mixes_both_caption_sets(corpus) -> None:
    rows, attributes = corpus
    mixed = synthetic_captions(rows, SyntheticConfig(include_real=True), CaptionerContext(attributes=attributes))
    assert set(rows["caption_id"]) <= set(mixed["caption_id"])
    assert (mixed["caption_id"].str.startswith("syn:")).sum() == 2 * rows.drop_duplicates(["image_id", "lang"]).shape[0]


def test_a_registered_captioner_gets_the_checkpoint(corpus) -> None:
    rows, _ = corpus
    seen = {}

    @register_captioner("test_echo")
    def echo(frame, options, context):
        seen.update(checkpoint=context.checkpoint, options=options, seed=context.seed)
        return frame.assign(caption=frame["caption"].str.upper(), caption_id="syn:" + frame["caption_id"])

    assert "test_echo" in list_captioners() and "template" in list_captioners()
    out = synthetic_captions(rows, SyntheticConfig(captioner="test_echo", options={"k": 1}, seed=7),
                             CaptionerContext(checkpoint={"format": "x"}))
    assert seen == {"checkpoint": {"format": "x"}, "options": {"k": 1}, "seed": 7}
    en = out[out["lang"] == "en"]
    assert len(out) == len(rows) and (en["caption"] == en["caption"].str.upper()).all()


def test_errors_name_the_problem(corpus) -> None:
    rows, attributes = corpus
    with pytest.raises(ConfigError, match=r"synthetic.captioner='nope' is not registered; the captioners are"):
        synthetic_captions(rows, SyntheticConfig(captioner="nope"), CaptionerContext())
    with pytest.raises(ConfigError, match=r"synthetic.captioner=blip needs a trained BLIP model: set the recipe's"):
        synthetic_captions(rows, SyntheticConfig(captioner="blip"), CaptionerContext())
    with pytest.raises(DatasetFormatError, match="no ground-truth attributes for image .*only the built-in dataset"):
        synthetic_captions(rows, SyntheticConfig(), CaptionerContext(attributes={}))
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['temperature'\] of the template captioner"):
        synthetic_captions(rows, SyntheticConfig(options={"temperature": 1}), CaptionerContext(attributes=attributes))
    with pytest.raises(ConfigError, match=r"recipe.synthetic: unknown field\(s\) \['model'\]"):
        SyntheticConfig.from_dict({"model": "x"}, "recipe.synthetic")
