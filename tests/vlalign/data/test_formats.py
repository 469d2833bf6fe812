"""Tests of the dataset-format loaders (Karpathy JSON, class folders, line files)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from vlalign.data.demo import DemoConfig, generate_demo_dataset
from vlalign.data.formats import (
    IMAGE_TABLE_COLUMNS, MANIFEST_COLUMNS, load_corpus, load_csv_manifest, load_imagefolder, load_karpathy, load_lines,
)
from vlalign.errors import ConfigError, DatasetFormatError

TINY = DemoConfig(n_train=12, n_val=4, n_test=4, zero_shot_per_class=2)


@pytest.fixture(scope="module")
def flickr(tmp_path_factory) -> Path:
    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "data", TINY) / "flickr_demo"


@pytest.fixture(scope="module")
def imagenet(flickr) -> Path:
    return flickr.parent / "imagenet_demo"


def _sources(flickr: Path) -> list[dict]:
    return [
        {"json": flickr / "dataset_demo.json", "image_root": flickr / "images", "lang": "en"},
        {"json": flickr / "dataset_demo_zh.json", "image_root": flickr / "images", "lang": "zh"},
    ]


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_load_karpathy_demo(flickr):
    manifest = load_karpathy(flickr / "dataset_demo.json", flickr / "images")
    assert tuple(manifest.columns) == MANIFEST_COLUMNS
    assert len(manifest) == 20 * 5
    first = manifest.iloc[0]
    assert first["image_id"] == "0" and first["caption_id"] == "en:0" and first["lang"] == "en"
    assert first["source"] == "dataset_demo.json:images[0].sentences[0]"
    assert os.path.isabs(first["image_path"]) and Path(first["image_path"]).is_file()
    assert manifest["split"].value_counts().to_dict() == {"train": 60, "val": 20, "test": 20}
    assert manifest["load_error"].isna().all()
    assert first["entry"] == "dataset_demo.json:images[0]"
    assert first["image_root"] == os.path.realpath(flickr / "images")
    assert all(isinstance(v, str) for col in MANIFEST_COLUMNS if col != "load_error" for v in manifest[col])


def test_load_corpus_combines_languages(flickr):
    manifest = load_corpus(_sources(flickr))
    assert len(manifest) == 20 * 7 and manifest["caption_id"].is_unique
    assert manifest["lang"].value_counts().to_dict() == {"en": 100, "zh": 40}
    assert (manifest.groupby("image_id")["image_path"].nunique() == 1).all()  # same image in both files


def test_load_corpus_needs_id_prefix_for_overlapping_corpora(flickr):
    twice = _sources(flickr)[:1] * 2
    clash = load_corpus(twice)  # the second copy's caption ids repeat the first's: quarantined, not merged
    assert clash["load_error"].iloc[:100].isna().all()
    assert clash["load_error"].iloc[100:].str.contains(r"repeats dataset_demo\.json:images\[\d+\]\.sentences.*id_prefix").all()
    twice[1] = {**twice[1], "id_prefix": "copy:"}
    manifest = load_corpus(twice)
    assert "copy:0" in set(manifest["image_id"]) and "en:copy:0" in set(manifest["caption_id"])
    with pytest.raises(ConfigError, match=r"sources\[0\] lacks \['lang'\]"):
        load_corpus([{"json": "x", "image_root": "y"}])


def test_restval_maps_to_train_and_filepath_is_joined(tmp_path):
    (tmp_path / "train2014").mkdir()
    data = {"images": [
        {"filepath": "train2014", "filename": "a.jpg", "imgid": 7, "split": "restval",
         "sentences": [{"raw": "a cat on a mat", "sentid": 70, "imgid": 7, "tokens": []}]},
    ], "dataset": "coco"}
    manifest = load_karpathy(_write(tmp_path / "d.json", data), tmp_path)
    assert manifest["split"].tolist() == ["train"]
    assert manifest["image_path"].tolist() == [str(tmp_path.absolute() / "train2014" / "a.jpg")]


def _break(data: dict, how: str) -> dict | list | str:
    data = copy.deepcopy(data)
    image = data["images"][1]
    if how == "top_level_list":
        return data["images"]
    if how == "no_filename":
        del image["filename"]
    elif how == "bad_imgid":
        image["imgid"] = 1.5
    elif how == "bad_split":
        image["split"] = "dev"
    elif how == "no_sentences":
        image["sentences"] = []
    elif how == "no_raw":
        del image["sentences"][2]["raw"]
    elif how == "raw_not_text":
        image["sentences"][2]["raw"] = None
    elif how == "no_sentid":
        del image["sentences"][2]["sentid"]
    elif how == "duplicate_sentid":
        image["sentences"][2]["sentid"] = data["images"][0]["sentences"][0]["sentid"]
    elif how == "imgid_mismatch":
        image["sentences"][2]["imgid"] = 999
    elif how == "raw_number":
        image["sentences"][2]["raw"] = 42
    elif how == "duplicate_imgid":
        image["imgid"] = 0
        for sentence in image["sentences"]:
            sentence["imgid"] = 0
    return data


@pytest.mark.parametrize(
    "how, field, rows",
    [
        ("no_filename", "images[1].filename is missing; expected a non-empty string", "entry"),
        ("bad_imgid", "images[1].imgid is 1.5; expected an integer image id", "entry"),
        ("bad_split", "images[1].split is 'dev'; expected one of", "entry"),
        ("no_sentences", "images[1].sentences is []; expected a non-empty list", "entry"),
        ("no_raw", "images[1].sentences[2].raw is missing; expected a string (the caption)", "caption"),
        ("raw_not_text", "images[1].sentences[2].raw is None; expected a string (the caption)", "caption"),
        ("raw_number", "images[1].sentences[2].raw is 42; expected a string (the caption)", "caption"),
        ("no_sentid", "images[1].sentences[2].sentid is missing; expected an integer sentence id", "caption"),
        ("duplicate_sentid", "images[1].sentences[2].sentid=0 repeats the sentid of images[0].sentences[0]", "caption"),
        ("imgid_mismatch", "images[1].sentences[2].imgid is 999; expected 1 (the imgid of its image)", "caption"),
        ("duplicate_imgid", "images[1].imgid=0 repeats the imgid of images[0] (000000.png)", "entry"),
    ],
)
def test_malformed_entry_is_quarantined_not_fatal(flickr, tmp_path, how, field, rows):
    """A malformed entry or sentence gets a load error naming the field and what was expected; the rest loads."""
    data = json.loads((flickr / "dataset_demo.json").read_text(encoding="utf-8"))
    path = _write(tmp_path / "broken.json", _break(data, how))
    manifest = load_karpathy(path, flickr / "images")
    bad = manifest[manifest["load_error"].notna()]
    assert bad["load_error"].str.contains(field, regex=False).all(), bad["load_error"].tolist()
    assert set(bad["entry"]) == {"broken.json:images[1]"}
    if rows == "caption":
        assert bad["source"].tolist() == ["broken.json:images[1].sentences[2]"]
    else:  # the whole entry: every caption row (or one row when it has no usable sentence list)
        assert len(bad) == (1 if how == "no_sentences" else 5)
    good = manifest[manifest["load_error"].isna()]
    assert len(good) == len(manifest) - len(bad) and good["entry"].nunique() >= 19
    assert good["caption"].map(lambda c: isinstance(c, str)).all()


def test_top_level_shape_is_a_file_error(flickr, tmp_path):
    data = json.loads((flickr / "dataset_demo.json").read_text(encoding="utf-8"))
    path = _write(tmp_path / "list.json", data["images"])
    with pytest.raises(DatasetFormatError, match=r'list\.json: top level is list; expected an object with an "images" list'):
        load_karpathy(path, flickr / "images")


def test_missing_or_corrupt_files(flickr, tmp_path):
    with pytest.raises(DatasetFormatError, match="file not found"):
        load_karpathy(tmp_path / "nope.json", flickr / "images")
    truncated = tmp_path / "t.json"
    truncated.write_text((flickr / "dataset_demo.json").read_text(encoding="utf-8")[:500], encoding="utf-8")
    with pytest.raises(DatasetFormatError, match="invalid JSON at line 1"):
        load_karpathy(truncated, flickr / "images")
    with pytest.raises(DatasetFormatError, match="image folder"):
        load_karpathy(flickr / "dataset_demo.json", tmp_path / "no_images")
    with pytest.raises(ConfigError, match="lang"):
        load_karpathy(flickr / "dataset_demo.json", flickr / "images", lang="fr")


def test_load_imagefolder(imagenet):
    table, wnids = load_imagefolder(imagenet / "val")
    assert wnids == load_lines(imagenet / "wnids.txt")
    assert list(table.columns) == list(IMAGE_TABLE_COLUMNS)
    assert table["load_error"].isna().all() and (table["image_root"] == os.path.realpath(imagenet / "val")).all()
    assert len(table) == len(wnids) * TINY.zero_shot_per_class
    assert (table["wnid"].map({w: i for i, w in enumerate(wnids)}) == table["label"]).all()
    assert table["label"].is_monotonic_increasing and Path(table["image_path"].iloc[0]).is_file()
    pinned, pinned_wnids = load_imagefolder(imagenet / "val", wnids_file=imagenet / "wnids.txt")
    assert pinned_wnids == wnids and pinned.equals(table)


def test_load_imagefolder_errors(imagenet, tmp_path):
    with pytest.raises(DatasetFormatError, match="not found"):
        load_imagefolder(tmp_path / "nope")
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes(b"")
    with pytest.raises(DatasetFormatError, match="no class sub-folders"):
        load_imagefolder(flat)
    (flat / "n1").mkdir()
    (flat / "n1" / "readme.txt").write_text("x")
    with pytest.raises(DatasetFormatError, match="hold no image files"):
        load_imagefolder(flat)
    short = tmp_path / "wnids.txt"
    short.write_text("n90000001\n")
    with pytest.raises(DatasetFormatError, match="not listed"):
        load_imagefolder(imagenet / "val", wnids_file=short)


def test_load_lines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a photo of a {}.\n  a drawing of a {}.  \n\n\n", encoding="utf-8")
    assert load_lines(path, must_contain="{}") == ["a photo of a {}.", "a drawing of a {}."]
    path.write_text("red circle\n\nblue square\n", encoding="utf-8")
    with pytest.raises(DatasetFormatError, match="line 2 is blank"):
        load_lines(path)
    path.write_text("a photo\n", encoding="utf-8")
    with pytest.raises(DatasetFormatError, match=r"line 1 .* lacks '\{\}'"):
        load_lines(path, must_contain="{}")
    with pytest.raises(DatasetFormatError, match="file not found"):
        load_lines(tmp_path / "missing.txt")
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DatasetFormatError, match="empty"):
        load_lines(path)


def test_csv_corpus_quarantines_bad_lines(flickr, tmp_path):
    path = tmp_path / "corpus.csv"
    path.write_text(
        "image_id,image,caption,split\n"
        "1,000000.png,a red circle on the left,train\n"
        "2,000001.png,,train\n"                 # no caption
        "3,000002.png,a blue square,dev\n"      # unknown split
        "4,../../../etc/hostname,a file outside,train\n",  # climbs out: loads, validation quarantines it
        encoding="utf-8",
    )
    manifest = load_csv_manifest(path, flickr / "images")
    assert pd.isna(manifest["load_error"].iloc[0])
    assert "column caption is empty" in manifest["load_error"].iloc[1]
    assert "split is 'dev'; expected one of" in manifest["load_error"].iloc[2]
    assert pd.isna(manifest["load_error"].iloc[3]) and manifest["entry"].iloc[3] == "corpus.csv:5"
    with pytest.raises(DatasetFormatError, match=r"corpus\.csv: line 1 lacks column\(s\) \['split'\]"):
        path.write_text("image_id,image,caption\n1,a.png,x\n", encoding="utf-8")
        load_csv_manifest(path, flickr / "images")
