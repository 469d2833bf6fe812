"""Controlled conditions of the built-in dataset (noisy pairs, near-duplicate captions, fine detail): each writes what
its ground truth says, leaves what it should not touch alone, and the default dataset stays byte for byte the same."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import itertools
import json
import zlib
from pathlib import Path

import numpy as np
import PIL
import pytest
from PIL import Image

from vlalign.cli import main
from vlalign.data import demo
from vlalign.data.demo import BACKGROUND_RGB, GROUND_TRUTH_FILE, DemoConfig, generate_demo_dataset
from vlalign.data.formats import load_corpus
from vlalign.errors import ConfigError
from vlalign.validation.expectations import validate_manifest

SMALL = dict(n_train=60, n_val=10, n_test=10, zero_shot_per_class=1)
NEAR = DemoConfig(n_train=80, n_val=20, n_test=20, zero_shot_per_class=1, near_duplicates=0.5)

#: The default dataset generated at commit 42a5985 (before the conditions), digested by :func:`_digests`, with the
#: versions that decide those bytes: numpy draws every attribute and pixel noise, Pillow rasterises the shapes, and
#: zlib compresses the PNGs.
MAIN_DEFAULT = {"content": "498eff15a99f5ae9d688c394a96bcb101a8b0b40e529aae434100545d17f04ed",
                "bytes": "30c39ce3b074535fbeaff1a7e37203c7a6151589542b758b7a06003840c4a2d3"}
MAIN_VERSIONS = {"numpy": "2.4.6", "Pillow": "13.0.0", "zlib": "1.2.13"}
#: DONE's config hash of the default dataset at 42a5985 (a sha256 of JSON: the same on every machine).
MAIN_DEFAULT_HASH = "3d1f8f2cfa91588398bade5585192bde299fb1f8749ce04cfac304f5c9306eb5"


def _before_conditions():
    """The writer as it was before the conditions (a verbatim copy beside this file)."""
    spec = importlib.util.spec_from_file_location("_demo_before_conditions",
                                                  Path(__file__).with_name("_demo_before_conditions.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _digests(root: Path) -> dict[str, str]:
    """``content``: every file's bytes, a PNG's decoded pixels instead of its bytes (no zlib in it); ``bytes``: every
    file's bytes."""
    content, raw = hashlib.sha256(), hashlib.sha256()
    for rel, data in _tree(root).items():
        raw.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
        if rel.endswith(".png"):
            with Image.open(root / rel) as image:
                data = f"{image.mode} {image.size}".encode() + image.tobytes()
        content.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    return {"content": content.hexdigest(), "bytes": raw.hexdigest()}


def _entries(root: Path, lang: str) -> list[dict]:
    name = "dataset_demo.json" if lang == "en" else "dataset_demo_zh.json"
    return json.loads((root / "flickr_demo" / name).read_text(encoding="utf-8"))["images"]


def _truth(root: Path) -> dict:
    return json.loads((root / "flickr_demo" / GROUND_TRUTH_FILE).read_text(encoding="utf-8"))


def _edit_distance(a: list | str, b: list | str) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


# ---------------------------------------------------------------------------------------------------------------------
# Defaults unchanged
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [
    DemoConfig(n_train=150, n_val=20, n_test=20, zero_shot_per_class=1, near_miss_fraction=0.5),
    DemoConfig(n_train=40, n_val=8, n_test=8, zero_shot_per_class=1, image_size=128, patterns=True),
], ids=["plain", "fine_detail"])
def test_conditions_off_write_what_the_writer_before_them_wrote(tmp_path, monkeypatch, config):
    """On any machine: the same files as the verbatim earlier writer, plus only the ground truth of fine detail."""
    now = _tree(generate_demo_dataset(tmp_path / "now", config))
    monkeypatch.setattr(demo, "_write_flickr", _before_conditions()._write_flickr)
    before = _tree(generate_demo_dataset(tmp_path / "before", config))
    assert set(now) - set(before) == ({f"flickr_demo/{GROUND_TRUTH_FILE}"} if config.patterns else set())
    assert {rel: now[rel] for rel in before} == before


def test_the_default_dataset_is_byte_identical_to_main(tmp_path):
    config = DemoConfig()
    assert config.config_hash() == MAIN_DEFAULT_HASH
    assert not set(config.recorded()) & set(demo._LATER_FIELDS)  # DONE records the fields it always did
    root = generate_demo_dataset(tmp_path / "data", config)
    assert not (root / "flickr_demo" / GROUND_TRUTH_FILE).exists()
    versions = {"numpy": np.__version__, "Pillow": PIL.__version__, "zlib": zlib.ZLIB_RUNTIME_VERSION}
    if {k: versions[k] for k in ("numpy", "Pillow")} != {k: MAIN_VERSIONS[k] for k in ("numpy", "Pillow")}:
        pytest.skip(f"hashes recorded with {MAIN_VERSIONS}, this machine has {versions}; the test above compares "
                    "with the earlier writer on any machine")
    digests = _digests(root)
    assert digests["content"] == MAIN_DEFAULT["content"]
    if versions == MAIN_VERSIONS:  # the PNG bytes also depend on zlib's compressor
        assert digests["bytes"] == MAIN_DEFAULT["bytes"]


# ---------------------------------------------------------------------------------------------------------------------
# Noisy pairs
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory) -> Path:
    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "clean", DemoConfig(**SMALL))


@pytest.mark.parametrize("fraction", [0.2, 0.4])
def test_noisy_pairs_match_their_ground_truth_and_leave_the_rest_alone(tmp_path, clean_root, fraction):
    root = generate_demo_dataset(tmp_path / "noisy", DemoConfig(**SMALL, noise_fraction=fraction))
    truth = _truth(root)
    assert truth["config"]["noise_fraction"] == fraction and "near_duplicates" not in truth
    records = truth["noise"]["captions"]
    noisy_tree, clean_tree = _tree(root), _tree(clean_root)
    changed = {rel for rel in clean_tree if noisy_tree[rel] != clean_tree[rel]}
    assert changed == {"flickr_demo/dataset_demo.json", "flickr_demo/dataset_demo_zh.json", "DONE"}  # images too
    for lang, n_captions in (("en", 5), ("zh", 2)):
        entries, clean = _entries(root, lang), _entries(clean_root, lang)
        clean_raw = {s["sentid"]: s["raw"] for e in clean for s in e["sentences"]}
        ours = [r for r in records if r["lang"] == lang]
        train_ids = [s["sentid"] for e in entries if e["split"] == "train" for s in e["sentences"]]
        assert [r["sentid"] for r in ours] == train_ids  # every training caption, once; none of val/test
        n_noisy = sum(r["noisy"] for r in ours)
        assert n_noisy == round(fraction * SMALL["n_train"] * n_captions) == truth["noise"]["counts"][lang]["noisy"]
        sentences = {s["sentid"]: (e, s) for e in entries for s in e["sentences"]}
        for record in ours:
            entry, sentence = sentences[record["sentid"]]
            assert record["caption_id"] == f"{lang}:{record['sentid']}" and record["imgid"] == entry["imgid"]
            assert sentence["imgid"] == entry["imgid"] and sentence["tokens"]
            assert sentence["raw"] == clean_raw[record["source_sentid"]]  # the caption it really is
            donor = clean[record["describes_imgid"]]
            assert record["source_sentid"] in donor["sentids"] and donor["split"] == "train"
            if record["noisy"]:  # another image's caption, wrong for this one: another colour or shape
                mine, theirs = entry["attributes"], donor["attributes"]
                assert (mine["colour"], mine["shape"]) != (theirs["colour"], theirs["shape"])
                assert sentence["raw"] != clean_raw[record["sentid"]]
            else:
                assert record["describes_imgid"] == entry["imgid"] and record["source_sentid"] == record["sentid"]
        for entry, before in zip(entries, clean, strict=True):
            if entry["split"] != "train":
                assert entry == before  # val and test untouched
            assert {k: v for k, v in entry.items() if k != "sentences"} == {
                k: v for k, v in before.items() if k != "sentences"}


def test_noise_is_seeded(tmp_path):
    config = DemoConfig(**SMALL, noise_fraction=0.2)
    a, b = generate_demo_dataset(tmp_path / "a", config), generate_demo_dataset(tmp_path / "b", config)
    assert _tree(a) == _tree(b)
    other = _truth(generate_demo_dataset(tmp_path / "c", dataclasses.replace(config, seed=1)))
    assert [r["noisy"] for r in other["noise"]["captions"]] != [r["noisy"] for r in _truth(a)["noise"]["captions"]]


# ---------------------------------------------------------------------------------------------------------------------
# Near-duplicate captions
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def near_root(tmp_path_factory) -> Path:
    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "near", NEAR)


def test_near_duplicate_groups_are_recorded_per_split(near_root):
    groups = _truth(near_root)["near_duplicates"]["groups"]
    entries = _entries(near_root, "en")
    for split, n in (("train", NEAR.n_train), ("val", NEAR.n_val), ("test", NEAR.n_test)):
        ours = [g for g in groups if g["split"] == split]
        assert len(ours) == round(NEAR.near_duplicates * n / NEAR.near_duplicate_group_size)
        for group in ours:
            ids = group["imgids"]
            assert len(ids) == NEAR.near_duplicate_group_size and ids == list(range(ids[0], ids[0] + len(ids)))
            assert all(entries[i]["split"] == split and entries[i]["near_miss"] is None for i in ids)
    grouped = [i for g in groups for i in g["imgids"]]
    assert len(grouped) == len(set(grouped))
    assert {g["varied"] for g in groups} == {"colour", "shape"}


def test_near_duplicates_look_different_and_read_alike(near_root):
    """Images of a group differ clearly in the varied attribute alone; the captions differ by that one word (one or
    two Chinese characters)."""
    en, zh = _entries(near_root, "en"), _entries(near_root, "zh")
    for group in _truth(near_root)["near_duplicates"]["groups"]:
        ids, varied = group["imgids"], group["varied"]
        attributes = [en[i]["attributes"] for i in ids]
        assert len({a[varied] for a in attributes}) == len(ids)  # a different colour or shape each
        shared = [{k: v for k, v in a.items() if k != varied} for a in attributes]
        assert all(a == shared[0] for a in shared) and shared[0]["size"] == "large"
        pixels = [np.asarray(Image.open(near_root / "flickr_demo" / "images" / en[i]["filename"]), dtype=float)
                  for i in ids]  # (64, 64, 3) each
        for p, q in itertools.combinations(pixels, 2):
            shapes = (np.abs(p - BACKGROUND_RGB).max(axis=2) > 60) | (np.abs(q - BACKGROUND_RGB).max(axis=2) > 60)
            # Over 15 % of the shapes' pixels change by more than 60 levels: pixel noise (std 4) never does.
            assert (np.abs(p - q).max(axis=2)[shapes] > 60).mean() > 0.15
        for k in range(NEAR.captions_en):
            words = [en[i]["sentences"][k]["tokens"] for i in ids]
            for a, b in itertools.combinations(words, 2):
                assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1, (a, b)
        for k in range(NEAR.captions_zh):
            raws = [zh[i]["sentences"][k]["raw"] for i in ids]
            for a, b in itertools.combinations(raws, 2):
                assert 1 <= _edit_distance(a, b) <= 2, (a, b)


def test_near_duplicates_are_seeded_and_recorded_in_the_hash(tmp_path, near_root):
    assert _tree(generate_demo_dataset(tmp_path / "again", NEAR)) == _tree(near_root)
    bigger = dataclasses.replace(NEAR, near_duplicate_group_size=6)
    assert bigger.config_hash() != NEAR.config_hash() and NEAR.recorded()["near_duplicates"] == 0.5
    groups = _truth(generate_demo_dataset(tmp_path / "six", bigger))["near_duplicates"]["groups"]
    assert {g["varied"] for g in groups} == {"colour"}  # only colour has 6 values


# ---------------------------------------------------------------------------------------------------------------------
# Fine detail, all together, validation, bad options
# ---------------------------------------------------------------------------------------------------------------------


def test_fine_detail_is_recorded_and_an_older_copy_without_ground_truth_is_remade(tmp_path):
    config = DemoConfig(n_train=12, n_val=4, n_test=4, zero_shot_per_class=1, image_size=128, patterns=True)
    root = generate_demo_dataset(tmp_path / "hi", config)
    fine = _truth(root)["fine_detail"]
    assert fine["pattern_of_image"] == [e["attributes"]["pattern"] for e in _entries(root, "en")]
    assert fine["image_size"] == 128 and fine["attribute"] == "pattern"
    (root / "flickr_demo" / GROUND_TRUTH_FILE).unlink()  # as generated before the ground truth existed
    generate_demo_dataset(root, config)
    assert _truth(root)["fine_detail"] == fine


def test_data_with_every_condition_passes_the_validation_suite(tmp_path):
    config = DemoConfig(n_train=40, n_val=8, n_test=8, zero_shot_per_class=1, noise_fraction=0.4, near_duplicates=0.5,
                        patterns=True)
    flickr = generate_demo_dataset(tmp_path / "data", config) / "flickr_demo"
    truth = _truth(flickr.parent)
    assert {"noise", "near_duplicates", "fine_detail"} <= set(truth)
    manifest = load_corpus([
        {"json": flickr / "dataset_demo.json", "image_root": flickr / "images", "lang": "en"},
        {"json": flickr / "dataset_demo_zh.json", "image_root": flickr / "images", "lang": "zh"},
    ])
    result = validate_manifest(manifest)
    assert result.success and result.quarantine.empty and len(result.clean) == 56 * 7
    noisy_ids = {r["caption_id"] for r in truth["noise"]["captions"] if r["noisy"]}
    assert noisy_ids <= set(result.clean["caption_id"])  # the ground truth joins the manifest on caption_id


@pytest.mark.parametrize("overrides,field", [
    ({"noise_fraction": 1.5}, "noise_fraction"),
    ({"noise_fraction": "0.2"}, "noise_fraction"),
    ({"near_duplicates": -0.1}, "near_duplicates"),
    ({"near_duplicate_group_size": 1}, "near_duplicate_group_size"),
    ({"near_duplicate_group_size": 8}, "near_duplicate_group_size"),
    ({"patterns": "yes"}, "patterns"),
    ({"noise": 0.2}, "noise"),
])
def test_a_bad_option_is_a_short_error_naming_it(tmp_path, capsys, overrides, field):
    with pytest.raises(ConfigError, match=field) as error:
        DemoConfig.from_mapping(overrides)
    assert len(str(error.value)) < 400 and "\n" not in str(error.value)
    assert main(["demo", "--root", str(tmp_path / "x"), "--config", json.dumps(overrides)]) == 1
    assert field in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_noise_needs_an_image_of_another_colour_or_shape(tmp_path):
    with pytest.raises(ConfigError, match="noise_fraction"):
        generate_demo_dataset(tmp_path / "x", DemoConfig(n_train=1, n_val=0, n_test=0, zero_shot_per_class=1,
                                                         noise_fraction=0.4))



def test_config_that_is_not_json_is_a_short_error(tmp_path, capsys):
    assert main(["demo", "--root", str(tmp_path / "x"), "--config", "{noise_fraction: 0.2}"]) == 1
    assert "vlalign demo --config: not JSON" in capsys.readouterr().err
