"""Loaders on tiny fixtures in exactly the published formats: Flickr30k (Karpathy), COCO-CN, ImageNet val."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from vlalign.data.fixtures import make_coco_cn_fixture, make_flickr30k_fixture, make_imagenet_fixture
from vlalign.data.formats import _NOT_COCO_ID, MANIFEST_COLUMNS, load_coco_cn, load_imagefolder, load_imagenet_flat, load_karpathy
from vlalign.errors import ConfigError, DatasetFormatError


# ---------- Flickr30k (Karpathy dataset_flickr30k.json) ----------

def test_flickr30k_multi_caption_mapping(tmp_path):
    fx = make_flickr30k_fixture(tmp_path / "flickr30k")
    manifest = load_karpathy(fx["json"], fx["image_root"], lang="en")
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    assert len(manifest) == fx["n_images"] * 5
    per_image = manifest.groupby("image_id")
    assert per_image.size().eq(5).all()
    assert per_image["image_path"].nunique().eq(1).all()
    assert manifest.drop_duplicates("image_id")["split"].value_counts().to_dict() == fx["splits"]
    assert manifest["caption_id"].is_unique
    assert all(os.path.isfile(p) for p in manifest["image_path"])


# ---------- COCO-CN ----------

def test_coco_cn_manifest(tmp_path):
    fx = make_coco_cn_fixture(tmp_path / "coco_cn")
    manifest = load_coco_cn(fx["root"], fx["image_roots"])
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    assert set(manifest["lang"]) == {"zh"}
    for split, ids in fx["splits"].items():
        assert list(dict.fromkeys(manifest.loc[manifest["split"] == split, "image_id"])) == ids
    assert manifest.groupby("image_id").size().to_dict() == fx["n_captions"]
    assert "COCO_val2014_000000999999" not in set(manifest["image_id"])  # captioned but in no split
    row = manifest[manifest["caption_id"] == "zh:COCO_val2014_000000290833#1"].iloc[0]
    assert row["split"] == "test" and row["caption"].endswith("描述1。")
    assert Path(row["image_path"]) == (fx["image_roots"] / "val2014" / "COCO_val2014_000000290833.jpg").resolve()
    train_row = manifest[manifest["image_id"] == "COCO_train2014_000000000138"].iloc[0]
    assert "/train2014/" in train_row["image_path"]
    assert all(os.path.isfile(p) for p in manifest["image_path"])
    assert manifest["caption_id"].is_unique


def test_coco_cn_test_only_and_folder_mapping(tmp_path):
    fx = make_coco_cn_fixture(tmp_path / "coco_cn")
    roots = {"train2014": fx["image_roots"] / "train2014", "val2014": fx["image_roots"] / "val2014"}
    manifest = load_coco_cn(fx["root"], roots, splits=("test",), id_prefix="cococn:")
    assert set(manifest["split"]) == {"test"}
    assert len(manifest) == sum(fx["n_captions"][i] for i in fx["splits"]["test"])
    assert manifest["image_id"].str.startswith("cococn:COCO_").all()


def _edit(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text(encoding="utf-8").replace(old, new, 1), encoding="utf-8")


@pytest.mark.parametrize(
    "old, new, reason",
    [
        ("COCO_val2014_000000290833#0\t", "COCO_val2014_000000290833#0 ", r"line \d+: .*is not '<image_id>#<n><TAB><caption>'"),
        ("COCO_val2014_000000290833#1\t", "COCO_val2014_000000290833\t", r"line \d+: .*is not '<image_id>#<n><TAB><caption>'"),
        ("COCO_val2014_000000290833#1\t", "COCO_val2014_000000290833#0\t", r"caption id 'COCO_val2014_000000290833#0' repeats imageid\.human-written-caption\.txt:\d+"),
        ("COCO_val2014_000000290833#0\t", "COCO_foo_290833#0\t", r"line \d+: .*COCO_foo_290833.*COCO 2014 image id"),
    ],
)
def test_coco_cn_malformed_caption_lines_are_quarantined(tmp_path, old, new, reason):
    fx = make_coco_cn_fixture(tmp_path / "coco_cn")
    _edit(fx["captions_file"], old, new)
    manifest = load_coco_cn(fx["root"], fx["image_roots"])
    bad = manifest[manifest["load_error"].notna()]
    assert len(bad) == 1 and bad["load_error"].str.contains(reason).all(), bad["load_error"].tolist()
    assert bad["source"].iloc[0].startswith("imageid.human-written-caption.txt:")
    assert manifest["load_error"].isna().sum() == len(manifest) - 1


def test_coco_cn_split_list_entries_are_quarantined(tmp_path):
    fx = make_coco_cn_fixture(tmp_path / "coco_cn")
    test_list = fx["root"] / "coco-cn_test.txt"
    _edit(test_list, "COCO_val2014_000000000164", "COCO_val2014_000000000042")  # also in train
    errors = load_coco_cn(fx["root"], fx["image_roots"]).set_index("source")["load_error"]
    assert errors["coco-cn_test.txt:3"] == ("image COCO_val2014_000000000042 is already listed at coco-cn_train.txt:3 "
                                            "(split 'train'); expected each image in one split")
    _edit(test_list, "COCO_val2014_000000000042", "COCO_val2014_000000555555")  # no caption
    errors = load_coco_cn(fx["root"], fx["image_roots"]).set_index("source")["load_error"]
    assert errors["coco-cn_test.txt:3"].startswith("image COCO_val2014_000000555555 (coco-cn_test.txt:3) has no caption")
    _edit(test_list, "COCO_val2014_000000555555", "290833.png")
    errors = load_coco_cn(fx["root"], fx["image_roots"]).set_index("source")["load_error"]
    assert errors["coco-cn_test.txt:3"] == "line 3: '290833.png' " + _NOT_COCO_ID
    assert errors.notna().sum() == 1


def test_coco_cn_missing_files(tmp_path):
    fx = make_coco_cn_fixture(tmp_path / "coco_cn")
    (fx["root"] / "coco-cn_val.txt").unlink()
    with pytest.raises(DatasetFormatError, match=r"coco-cn_val\.txt: file not found"):
        load_coco_cn(fx["root"], fx["image_roots"])
    manifest = load_coco_cn(fx["root"], fx["image_roots"], splits=("train", "test"))  # val not needed
    assert set(manifest["split"]) == {"train", "test"}
    with pytest.raises(DatasetFormatError, match=r"no-such\.txt: file not found"):
        load_coco_cn(fx["root"], fx["image_roots"], splits=("test",), captions_file="no-such.txt")
    with pytest.raises(DatasetFormatError, match=r"elsewhere/train2014: MS-COCO image folder train2014 not found \(needed for COCO_train2014_000000000138"):
        load_coco_cn(fx["root"], tmp_path / "elsewhere", splits=("test",))
    with pytest.raises(ConfigError, match="splits"):
        load_coco_cn(fx["root"], fx["image_roots"], splits=("restval",))


# ---------- ImageNet val ----------

def test_imagenet_folder_layout(tmp_path):
    fx = make_imagenet_fixture(tmp_path / "imagenet", layout="folder")
    table, wnids = load_imagefolder(fx["image_dir"])
    assert wnids == fx["wnids"]
    got = {Path(p).name: label for p, label in zip(table["image_path"], table["label"])}
    assert got == dict(zip(fx["files"], fx["labels"]))


@pytest.mark.parametrize("which", ["labels_txt", "labels_csv"])
def test_imagenet_flat_layout(tmp_path, which):
    fx = make_imagenet_fixture(tmp_path / "imagenet", layout="flat")
    table = load_imagenet_flat(fx["image_dir"], fx[which])
    assert [Path(p).name for p in table["image_path"]] == fx["files"]
    assert table["label"].tolist() == fx["labels"]
    assert table["wnid"].isna().all()
    named = load_imagenet_flat(fx["image_dir"], fx[which], wnids_file=_wnids(tmp_path, fx))
    assert named["wnid"].tolist() == [fx["wnids"][label] for label in fx["labels"]]


def _wnids(tmp_path: Path, fx: dict) -> Path:
    path = tmp_path / "wnids.txt"
    path.write_text("\n".join(fx["wnids"]) + "\n", encoding="utf-8")
    return path


def test_imagenet_flat_devkit_ground_truth_is_remapped(tmp_path):
    fx = make_imagenet_fixture(tmp_path / "imagenet", layout="flat")
    table = load_imagenet_flat(fx["image_dir"], fx["ground_truth"], index_base=1, label_wnids_file=fx["devkit_wnids"])
    assert table["label"].tolist() == fx["labels"]  # devkit IDs -> sorted-wnid indices
    assert table["wnid"].tolist() == [fx["wnids"][label] for label in fx["labels"]]


def test_imagenet_flat_errors(tmp_path):
    fx = make_imagenet_fixture(tmp_path / "imagenet", layout="flat")
    txt, csv_file = fx["labels_txt"], fx["labels_csv"]
    lines = txt.read_text().splitlines()
    txt.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DatasetFormatError, match=r"val_labels\.txt: 5 labels for 6 image files"):
        load_imagenet_flat(fx["image_dir"], txt)
    txt.write_text("\n".join(lines[:2] + ["cat"] + lines[3:]) + "\n")
    table = load_imagenet_flat(fx["image_dir"], txt)
    assert table["load_error"].tolist()[2] == "val_labels.txt line 3: label is 'cat'; expected one integer"
    assert table["load_error"].notna().sum() == 1 and pd.isna(table["label"].iloc[2])
    table = load_imagenet_flat(fx["image_dir"], fx["ground_truth"], index_base=0, label_wnids_file=fx["devkit_wnids"])
    assert table["load_error"].str.contains(r"ILSVRC2012_validation_ground_truth\.txt line \d+: label 3 is out of range; "
                                            r"expected 0\.\.2").sum() == 2
    csv_file.write_text(csv_file.read_text().replace("ILSVRC2012_val_00000002.JPEG", "ILSVRC2012_val_00000099.JPEG"))
    table = load_imagenet_flat(fx["image_dir"], csv_file).set_index("entry")["load_error"]
    assert table["val/ILSVRC2012_val_00000099.JPEG"] == (
        f"val_labels.csv line 3: image 'ILSVRC2012_val_00000099.JPEG' not found in {fx['image_dir']}; "
        "expected a file name of that folder")
    assert table["val/ILSVRC2012_val_00000002.JPEG"] == "image ILSVRC2012_val_00000002.JPEG has no 'filename,label' row in val_labels.csv"
    csv_file.write_text("name,cls\n")
    with pytest.raises(DatasetFormatError, match=r"val_labels\.csv: line 1 .*'filename,label'"):
        load_imagenet_flat(fx["image_dir"], csv_file)
    with pytest.raises(DatasetFormatError, match=r"missing\.txt: file not found"):
        load_imagenet_flat(fx["image_dir"], tmp_path / "missing.txt")
    with pytest.raises(DatasetFormatError, match=r"nowhere: ImageNet image folder not found"):
        load_imagenet_flat(tmp_path / "nowhere", txt)


def test_imagefolder_rejects_flat_layout(tmp_path):
    fx = make_imagenet_fixture(tmp_path / "imagenet", layout="flat")
    with pytest.raises(DatasetFormatError, match="no class sub-folders"):
        load_imagefolder(fx["image_dir"])


# ---------- class names, templates and the Chinese vocabulary from installed packages ----------

def test_imagenet_classnames_and_templates():
    pytest.importorskip("vlalign.data.classnames")
    from vlalign.data.classnames import imagenet_classnames, imagenet_templates

    try:
        en, zh = imagenet_classnames("en"), imagenet_classnames("zh")
    except FileNotFoundError as exc:
        pytest.skip(f"open-clip-torch / cn-clip not installed: {exc}")
    assert len(en) == len(zh) == 1000
    assert en[:3] == ["tench", "goldfish", "great white shark"] and zh[1] == "金鱼"
    for lang in ("en", "zh"):
        templates = imagenet_templates(lang)
        assert len(templates) == 80 and all("{}" in t for t in templates)
    with pytest.raises(ConfigError, match="lang"):
        imagenet_classnames("fr")


def test_chinese_vocab_tokenizer():
    from vlalign.data.classnames import chinese_bert_vocab_path
    from vlalign.data.tokenizers import build_tokenizer
    from vlalign.models import build_tokenizer_for, get_model_config

    try:
        path = chinese_bert_vocab_path()
    except FileNotFoundError as exc:
        pytest.skip(f"cn-clip not installed: {exc}")
    tokenizer = build_tokenizer(path)
    assert len(tokenizer) == 21128
    cfg = get_model_config("tiny-vit-bert-zh")
    tokenizer = build_tokenizer_for(cfg)
    assert len(tokenizer) == 21128
    ids = tokenizer("一个男人骑着自行车在街上。金鱼的照片。")["input_ids"]
    assert tokenizer.unk_token_id not in ids and len(ids) == 2 + 19
