"""Tests of the default (demo) dataset generator."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlalign.data import demo
from vlalign.data.demo import (
    ATTRIBUTES,
    BACKGROUND_RGB,
    COLOURS,
    DemoConfig,
    class_names,
    demo_vocabulary,
    generate_demo_dataset,
    swap_attribute_caption,
)
from vlalign.errors import ConfigError

TINY = DemoConfig(n_train=12, n_val=4, n_test=4, zero_shot_per_class=2)
EN_SHAPE_WORDS = {"circle": ("circle", "circles"), "square": ("square", "squares"),
                  "triangle": ("triangle", "triangles"), "star": ("star", "stars"), "cross": ("cross", "crosses")}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "data", TINY)


def _load(root: Path, name: str) -> dict:
    return json.loads((root / "flickr_demo" / name).read_text(encoding="utf-8"))


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def _dominant_colour(image: Image.Image) -> tuple[np.ndarray, int]:
    """Mean RGB of the pixels far from the background, and how many there are."""
    pixels = np.asarray(image, dtype=float).reshape(-1, 3)
    far = np.abs(pixels - np.array(BACKGROUND_RGB)).max(axis=1) > 60
    return pixels[far].mean(axis=0), int(far.sum())


def test_default_config_matches_the_brief():
    config = DemoConfig()
    assert (config.image_size, config.n_train, config.n_val, config.n_test) == (64, 2000, 200, 500)
    assert (config.captions_en, config.captions_zh, config.zero_shot_per_class, config.seed) == (5, 2, 20, 0)


def test_layout(tiny_root):
    for rel in ["flickr_demo/dataset_demo.json", "flickr_demo/dataset_demo_zh.json", "imagenet_demo/wnids.txt",
                "imagenet_demo/classnames_en.txt", "imagenet_demo/classnames_zh.txt",
                "imagenet_demo/templates_en.txt", "imagenet_demo/templates_zh.txt", "DONE"]:
        assert (tiny_root / rel).is_file(), rel
    assert len(list((tiny_root / "flickr_demo" / "images").glob("*.png"))) == 20
    marker = json.loads((tiny_root / "DONE").read_text())
    assert marker["config_hash"] == TINY.config_hash()


def test_karpathy_files_use_the_real_field_names(tiny_root):
    en, zh = _load(tiny_root, "dataset_demo.json"), _load(tiny_root, "dataset_demo_zh.json")
    assert en["dataset"] == zh["dataset"] == "flickr_demo"
    splits = [image["split"] for image in en["images"]]
    assert splits.count("train") == 12 and splits.count("val") == 4 and splits.count("test") == 4
    all_sentids = []
    for image_en, image_zh in zip(en["images"], zh["images"], strict=True):
        for image, n_captions in ((image_en, 5), (image_zh, 2)):
            assert {"filename", "imgid", "split", "sentids", "sentences", "attributes"} <= set(image)
            assert len(image["sentences"]) == n_captions
            assert image["sentids"] == [s["sentid"] for s in image["sentences"]]
            for sentence in image["sentences"]:
                assert set(sentence) == {"tokens", "raw", "imgid", "sentid"}
                assert sentence["imgid"] == image["imgid"] and sentence["tokens"]
            all_sentids += image["sentids"]
        assert (image_en["imgid"], image_en["filename"], image_en["split"]) == (
            image_zh["imgid"], image_zh["filename"], image_zh["split"])
        assert set(image_en["attributes"]) == set(ATTRIBUTES)
    assert len(all_sentids) == len(set(all_sentids)) == 20 * 7


def test_captions_name_colour_and_shape_in_varied_wording(tiny_root):
    en, zh = _load(tiny_root, "dataset_demo.json"), _load(tiny_root, "dataset_demo_zh.json")
    for image_en, image_zh in zip(en["images"], zh["images"]):
        attrs = image_en["attributes"]
        raws = [s["raw"] for s in image_en["sentences"]]
        assert len(set(raws)) == len(raws)  # five different captions
        for raw in raws:
            words = set(raw.lower().rstrip(".").replace(",", "").split())
            assert attrs["colour"] in words and words & set(EN_SHAPE_WORDS[attrs["shape"]]), raw
        for sentence in image_zh["sentences"]:
            assert demo._ZH_COLOUR[attrs["colour"]] in sentence["raw"]
            assert demo._ZH_SHAPE[attrs["shape"]] in sentence["raw"]
            assert not any(ch.isascii() and ch.isalpha() for ch in sentence["raw"])  # real Chinese, no English


def test_images_show_their_attributes(tiny_root):
    en = _load(tiny_root, "dataset_demo.json")
    areas: dict[str, list[int]] = {"small": [], "large": []}
    for image in en["images"]:
        attrs = image["attributes"]
        picture = Image.open(tiny_root / "flickr_demo" / "images" / image["filename"])
        assert picture.mode == "RGB" and picture.size == (64, 64)
        mean, area = _dominant_colour(picture)
        nearest = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - mean).sum())
        assert nearest == attrs["colour"], image["filename"]
        areas[attrs["size"]].append(area / attrs["count"])
    assert min(areas["large"]) > max(areas["small"])  # size is visible in every image


def test_near_misses_change_exactly_one_attribute(tmp_path):
    config = DemoConfig(n_train=60, n_val=0, n_test=0, zero_shot_per_class=1, near_miss_fraction=0.5)
    images = _load(generate_demo_dataset(tmp_path / "data", config), "dataset_demo.json")["images"]
    near = [image for image in images if image["near_miss"]]
    assert len(near) > 10
    for image in near:
        base = images[image["near_miss"]["of"]]["attributes"]
        changed = [a for a in ATTRIBUTES if image["attributes"][a] != base[a]]
        assert changed == [image["near_miss"]["changed"]]


def test_zero_shot_set(tiny_root):
    base = tiny_root / "imagenet_demo"
    wnids = (base / "wnids.txt").read_text().splitlines()
    names_en = (base / "classnames_en.txt").read_text().splitlines()
    names_zh = (base / "classnames_zh.txt").read_text().splitlines()
    assert wnids == sorted(wnids) and wnids[0] == "n90000001" and len(set(wnids)) == len(wnids)
    assert len(wnids) == len(names_en) == len(names_zh) == len(COLOURS) * len(demo.SHAPES)
    assert names_en[0] == "red circle" and names_zh[0] == "红色圆形"
    for name in ("templates_en.txt", "templates_zh.txt"):
        templates = (base / name).read_text().splitlines()
        assert len(templates) >= 5 and all("{}" in t for t in templates)
    for wnid, name_en in zip(wnids, names_en):
        files = sorted((base / "val" / wnid).glob("*.png"))
        assert len(files) == TINY.zero_shot_per_class
        mean, _ = _dominant_colour(Image.open(files[0]))
        assert min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - mean).sum()) == name_en.split()[0]
    assert [c[0] for c in class_names()] == wnids


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = generate_demo_dataset(tmp_path / "a", TINY)
    b = generate_demo_dataset(tmp_path / "b", TINY)
    assert _tree_digest(a) == _tree_digest(b)
    c = generate_demo_dataset(tmp_path / "c", DemoConfig(n_train=12, n_val=4, n_test=4, zero_shot_per_class=2, seed=1))
    assert _tree_digest(c)["flickr_demo/dataset_demo.json"] != _tree_digest(a)["flickr_demo/dataset_demo.json"]


def test_idempotent_and_regenerates_on_new_config(tmp_path, monkeypatch):
    root = generate_demo_dataset(tmp_path / "data", TINY)
    calls = []
    monkeypatch.setattr(demo, "_write_flickr", lambda *a: calls.append(a))
    assert generate_demo_dataset(root, TINY) == root
    assert calls == []  # same config: returned without generating anything
    monkeypatch.undo()
    bigger = DemoConfig(n_train=14, n_val=4, n_test=4, zero_shot_per_class=2)
    generate_demo_dataset(root, bigger)
    assert len(_load(root, "dataset_demo.json")["images"]) == 22
    assert json.loads((root / "DONE").read_text())["config_hash"] == bigger.config_hash()
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no temp or old copies left behind


def test_refuses_to_overwrite_a_non_demo_directory(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a demo dataset"):
        generate_demo_dataset(root, TINY)
    assert (root / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (generate_demo_dataset(empty, TINY) / "DONE").is_file()  # an empty folder is fine


def test_interrupted_run_leaves_no_partial_dataset(tmp_path, monkeypatch):
    root = generate_demo_dataset(tmp_path / "data", TINY)
    before = _tree_digest(root)

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_write_imagenet", crash)
    with pytest.raises(KeyboardInterrupt):
        generate_demo_dataset(root, DemoConfig(n_train=13, n_val=4, n_test=4, zero_shot_per_class=2))
    assert _tree_digest(root) == before  # the previous dataset is intact
    assert [p.name for p in tmp_path.iterdir()] == ["data"]
    with pytest.raises(KeyboardInterrupt):
        generate_demo_dataset(tmp_path / "fresh", TINY)
    assert not (tmp_path / "fresh").exists()


def test_temp_dirs_of_dead_runs_are_cleaned_up(tmp_path):
    dead = tmp_path / ".data.tmp-pid999999999-abc"  # no process has this id
    alive = tmp_path / f".data.tmp-pid{os.getpid()}-abc"  # a run still in progress
    dead.mkdir()
    alive.mkdir()
    generate_demo_dataset(tmp_path / "data", TINY)
    assert not dead.exists() and alive.exists()


def test_invalid_config_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match="captions_en"):
        generate_demo_dataset(tmp_path / "x", DemoConfig(captions_en=0))


@pytest.mark.parametrize("which", ATTRIBUTES)
def test_swap_attribute_caption_changes_only_that_attribute(which):
    rng = random.Random(0)
    attrs = {"colour": "red", "shape": "square", "size": "small", "position": "left", "count": 2}
    for _ in range(20):
        true, swapped = swap_attribute_caption(attrs, which, rng)
        assert true != swapped
        assert true.split()[-1] == swapped.split()[-1] or which == "position"
        assert "red" in true.split() and "squares" in true.split()
        if which == "colour":
            assert "red" not in swapped.split() and len(true.split()) == len(swapped.split())
        if which == "shape":
            assert "squares" not in swapped.split() and "red" in swapped.split()
        if which == "count":
            assert "two" not in swapped.split() and "red" in swapped.split()
    with pytest.raises(ConfigError, match="unknown"):
        swap_attribute_caption(attrs, "texture", rng)


def test_committed_vocab_file_is_generated_from_the_grammar():
    committed = (Path(demo.__file__).parent.parent / "assets" / "demo_vocab.txt").read_text(encoding="utf-8")
    vocab = demo_vocabulary()
    assert committed == "\n".join(vocab) + "\n"
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert len(vocab) == len(set(vocab))
    assert {"red", "circle", "crosses", "红", "圆", "##z", "z", "0", "。"} <= set(vocab)
