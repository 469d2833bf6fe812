"""Tests of the great-expectations manifest suite and the quarantine split.

Each expectation gets a manifest built from a tiny generated demo dataset with exactly one bad row
of its kind; the test checks that this row, and only it, is quarantined, naming that expectation.
The bad image files lie inside the corpus's image folder (so that only the rule under test fails), except
for the containment cases, which point outside it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image, ImageFile
from shared import png_bomb

from vlalign.data.demo import DemoConfig, generate_demo_dataset
from vlalign.data.formats import MANIFEST_COLUMNS, load_corpus
from vlalign.data.images import DEFAULT_MAX_PIXELS, ImageAccessError, declared_size, open_image
from vlalign.errors import DatasetFormatError, ValidationFailedError
from vlalign.validation.expectations import ValidationConfig, expectation_names, validate_manifest
from vlalign.validation.quarantine import enforce_threshold


@pytest.fixture(scope="module")
def flickr(tmp_path_factory) -> Path:
    config = DemoConfig(n_train=12, n_val=4, n_test=4, zero_shot_per_class=1)
    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "data", config) / "flickr_demo"


@pytest.fixture(scope="module")
def manifest(flickr) -> pd.DataFrame:
    return load_corpus([
        {"json": flickr / "dataset_demo.json", "image_root": flickr / "images", "lang": "en"},
        {"json": flickr / "dataset_demo_zh.json", "image_root": flickr / "images", "lang": "zh"},
    ])


#: The suite's config in these tests: a small pixel budget so that a 400x400 image is "too large".
CONFIG = ValidationConfig(max_image_pixels=100_000)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, flickr) -> dict[str, str]:
    folder = flickr / "images" / "bad"  # inside the corpus's image root
    folder.mkdir()
    good = (flickr / "images" / "000000.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "text.png").write_text("not an image")
    Image.new("RGB", (64, 16), (255, 0, 0)).save(folder / "thin.png")
    Image.new("RGB", (400, 400), (0, 0, 255)).save(folder / "large.png")
    big = (folder / "large.png").read_bytes()
    (folder / "large_truncated.png").write_bytes(big[: len(big) // 2])  # would fail to decode, were it decoded
    os.mkfifo(folder / "fifo.png")
    (folder / "dir.png").mkdir()
    outside = tmp_path_factory.mktemp("outside")  # a valid image outside the corpus, and a link to it inside
    (outside / "elsewhere.png").write_bytes(good)
    (folder / "link.png").symlink_to(outside / "elsewhere.png")
    files = {name: str(folder / f"{name}.png") for name in
             ("truncated", "text", "thin", "large", "large_truncated", "fifo", "dir", "link")}
    files["absolute"] = str(outside / "elsewhere.png")
    files["climbs"] = str(flickr / "images" / ".." / ".." / ".." / outside.name / "elsewhere.png")
    return files


def _row(manifest: pd.DataFrame, lang: str, split: str, sentence: int = 2) -> int:
    """Position of a caption row that is not its image's first row."""
    mask = (manifest["lang"] == lang) & (manifest["split"] == split)
    mask &= manifest["source"].str.endswith(f".sentences[{sentence}]")
    return int(mask.to_numpy().nonzero()[0][0])


def _with_new_image(manifest: pd.DataFrame, i: int, path: str) -> None:
    """Point row ``i`` at another image file under a fresh image id (so no id / split rule is involved)."""
    manifest.loc[i, "image_id"] = "new-image"
    manifest.loc[i, "image_path"] = path


def _mutate(manifest: pd.DataFrame, kind: str, bad_files: dict[str, str], tmp_path: Path) -> int:
    """Introduce one bad row of ``kind`` in place; return its position."""
    m = manifest
    i = _row(m, "en", "train")
    if kind == "entry_well_formed":
        m.loc[i, "load_error"] = "images[3].imgid is 1.5; expected an integer image id"
    elif kind.endswith("_not_null"):
        m.loc[i, kind.removesuffix("_not_null")] = None
    elif kind == "split_known":
        m.loc[i, "split"] = "dev"
    elif kind == "lang_known":
        m.loc[i, "lang"] = "fr"
    elif kind == "image_id_unique_in_split":
        other = m.loc[(m["split"] == "train") & (m["image_id"] != m.loc[i, "image_id"]), "image_path"].iloc[0]
        m.loc[i, "image_path"] = other  # a second file under an id already taken in this split
    elif kind == "image_in_one_split":
        i = _row(m, "en", "test")
        m.loc[i, "split"] = "train"  # a test image leaks into train: the train row is rejected
    elif kind == "caption_min_words_en":
        m.loc[i, "caption"] = "red circle."
    elif kind == "caption_min_han_chars_zh":
        i = _row(m, "zh", "train", sentence=1)
        m.loc[i, "caption"] = "红色。"
    elif kind == "caption_no_bad_characters":
        m.loc[i, "caption"] = m.loc[i, "caption"] + "\x07"
    elif kind == "image_inside_root":
        _with_new_image(m, i, bad_files["link"])  # a link inside the image folder to a valid image outside
    elif kind == "image_regular_file":
        _with_new_image(m, i, bad_files["fifo"])
    elif kind == "image_max_pixels":
        _with_new_image(m, i, bad_files["large_truncated"])
    elif kind == "image_exists":
        _with_new_image(m, i, str(Path(bad_files["thin"]).parent / "missing.png"))
    elif kind == "image_decodes":
        _with_new_image(m, i, bad_files["truncated"])
    elif kind == "image_min_side":
        _with_new_image(m, i, bad_files["thin"])
    else:
        raise AssertionError(f"no mutation for {kind}")
    return i


def test_clean_manifest_passes(manifest, tmp_path):
    result = validate_manifest(manifest, CONFIG)
    assert result.success and result.quarantine.empty
    assert result.clean.equals(manifest)
    report = result.report
    assert report["n_rows"] == report["n_clean"] == len(manifest) == 140
    assert report["rejected_fraction"] == 0.0 and report["within_threshold"]
    assert list(report["expectations"]) == expectation_names()
    assert report["statistics"]["evaluated_expectations"] == len(expectation_names())
    assert report["counts"] == {"rows": {"input": 140, "clean": 140, "quarantined": 0},
                                "entries": {"input": 40, "clean": 40, "partly_quarantined": 0, "quarantined": 0}}
    assert all(e["success"] and e["unexpected_count"] == 0 for e in report["expectations"].values())
    json.dumps(report)  # the report can be saved as a JSON metrics/artifact file
    enforce_threshold(result, 0.0, str(tmp_path / "q.csv"))  # nothing rejected: no error


@pytest.mark.parametrize("kind", expectation_names())
def test_each_expectation_quarantines_exactly_its_bad_row(manifest, bad_files, tmp_path, kind):
    bad = manifest.copy()
    i = _mutate(bad, kind, bad_files, tmp_path)
    result = validate_manifest(bad, CONFIG)
    q = result.quarantine
    assert q["caption_id"].tolist() == [bad.loc[i, "caption_id"]]
    assert q["failed_expectations"].tolist() == [kind]
    assert q["reason"].iloc[0]
    assert list(q.columns) == list(MANIFEST_COLUMNS) + ["failed_expectations", "reason"]
    assert list(result.clean.columns) == list(MANIFEST_COLUMNS)
    assert len(result.clean) + len(q) == len(bad) and bad.loc[i, "caption_id"] not in set(result.clean["caption_id"])
    assert not result.success
    info = result.report["expectations"]
    assert info[kind] == {**info[kind], "success": False, "unexpected_count": 1}
    assert [name for name, e in info.items() if not e["success"]] == [kind]


def test_reasons_are_specific(manifest, bad_files, tmp_path):
    bad = manifest.copy()
    rows = {kind: _mutate(bad, kind, bad_files, tmp_path) for kind in ("image_min_side",)}
    j = _row(bad, "en", "val")
    bad.loc[j, "caption"] = "bad\ufffd caption here"
    k = _row(bad, "en", "train", sentence=3)
    _with_new_image(bad, k, bad_files["text"])
    q = validate_manifest(bad, CONFIG).quarantine.set_index("caption_id")["reason"]
    assert q[bad.loc[rows["image_min_side"], "caption_id"]].endswith("is 64x16 px, smaller than 32 px on a side")
    assert q[bad.loc[j, "caption_id"]] == "caption contains U+FFFD"
    assert "does not decode (UnidentifiedImageError" in q[bad.loc[k, "caption_id"]]


def test_row_failing_several_expectations_lists_them_all(manifest, tmp_path):
    bad = manifest.copy()
    i = _row(bad, "en", "train")
    bad.loc[i, "caption"] = "red\x00"
    _with_new_image(bad, i, str(Path(manifest["image_path"].iloc[0]).parent / "missing.png"))
    q = validate_manifest(bad).quarantine
    assert q["failed_expectations"].tolist() == ["caption_min_words_en;caption_no_bad_characters;image_exists"]
    assert q["reason"].iloc[0].count("; ") == 2


def test_duplicate_image_id_keeps_the_first_file(manifest):
    bad = manifest.copy()
    i = _row(bad, "en", "train")
    first = bad.loc[i, "image_path"]
    other = bad.loc[(bad["split"] == "train") & (bad["image_id"] != bad.loc[i, "image_id"]), "image_path"].iloc[0]
    bad.loc[i, "image_path"] = other
    reason = validate_manifest(bad).quarantine["reason"].iloc[0]
    assert f"already names another image file ({first})" in reason


def test_threshold_error_names_expectations_and_quarantine_file(manifest, tmp_path):
    bad = manifest.copy()
    for k in range(3):
        bad.loc[_row(bad, "en", "train", sentence=k), "caption"] = "too short"
    bad.loc[_row(bad, "en", "val"), "image_id"] = None
    result = validate_manifest(bad)
    assert result.report["n_quarantined"] == 4 and result.rejected_fraction == pytest.approx(4 / 140)
    enforce_threshold(result, 0.05, "q.csv")  # 2.9 % <= 5 %: passes
    quarantine_path = str(tmp_path / "quarantine.csv")
    with pytest.raises(ValidationFailedError) as info:
        enforce_threshold(result, 0.01, quarantine_path)
    message = str(info.value)
    assert "caption_min_words_en: 3 rows" in message and "image_id_not_null: 1 rows" in message
    assert quarantine_path in message and "4 of 140 rows" in message
    assert "image_exists" not in message  # passing expectations are not listed
    with pytest.raises(ValidationFailedError, match="caption_min_words_en: 3 rows"):
        enforce_threshold(json.loads(json.dumps(result.report)), 0.01, quarantine_path)  # a saved report works too


def test_data_docs_are_written(manifest, tmp_path):
    docs = tmp_path / "docs"
    result = validate_manifest(manifest, data_docs_dir=docs, suite_name="demo_suite")
    index = docs / "index.html"
    assert index.is_file() and result.report["data_docs_index"] == str(index.absolute())
    assert "demo_suite" in index.read_text(encoding="utf-8")
    assert list((docs / "validations").rglob("*.html"))


def test_check_images_false_skips_image_expectations(manifest, bad_files):
    bad = manifest.copy()
    _with_new_image(bad, 0, str(Path(bad_files["thin"]).parent / "missing.png"))
    _with_new_image(bad, 7, bad_files["link"])
    bad.loc[7, "image_id"] = "new-image-2"
    config = ValidationConfig(check_images=False)
    result = validate_manifest(bad, config)
    # containment never opens a file, so it is checked even then
    assert result.quarantine["failed_expectations"].tolist() == ["image_inside_root"]
    assert not {"image_exists", "image_decodes", "image_min_side", "image_regular_file", "image_max_pixels"} & set(
        result.report["expectations"])


@pytest.mark.parametrize("which", ["link", "absolute", "climbs"])
def test_images_outside_the_root_are_refused_unopened(manifest, bad_files, which, monkeypatch):
    """An absolute path, a path that climbs out with '..', and a link inside the folder to a valid image outside:
    each is quarantined naming the path and the root, and is never opened."""
    import vlalign.data.images as images

    opened = []
    real_open = images.open_regular_file
    monkeypatch.setattr(images, "open_regular_file", lambda path: opened.append(path) or real_open(path))
    bad = manifest.copy()
    i = _row(bad, "en", "train")
    _with_new_image(bad, i, bad_files[which])
    result = validate_manifest(bad, CONFIG)
    q = result.quarantine
    assert q["failed_expectations"].tolist() == ["image_inside_root"]
    reason = q["reason"].iloc[0]
    root = os.path.realpath(Path(manifest["image_path"].iloc[0]).parent)
    assert bad_files[which] in reason and root in reason and "outside the image root" in reason
    assert not any("elsewhere" in path for path in opened)
    assert bad.loc[i, "caption_id"] not in set(result.clean["caption_id"])


def test_non_regular_and_oversized_images_are_not_read(manifest, bad_files):
    bad = manifest.copy()
    rows = {}
    for k, name in enumerate(("fifo", "dir", "large", "large_truncated")):
        rows[name] = _row(bad, "en", "train", sentence=k)
        bad.loc[rows[name], "image_id"] = f"new-{name}"
        bad.loc[rows[name], "image_path"] = bad_files[name]
    q = validate_manifest(bad, CONFIG).quarantine.set_index("image_id")
    assert q.loc["new-fifo", "reason"].endswith("is a FIFO, not a regular file; it is never opened")
    assert q.loc["new-dir", "reason"].endswith("is a directory, not a regular file; it is never opened")
    for name in ("large", "large_truncated"):  # the truncated one would fail to decode: it was never decoded
        assert q.loc[f"new-{name}", "failed_expectations"] == "image_max_pixels"
        assert "400x400 = 160,000 pixels, more than max_image_pixels=100,000" in q.loc[f"new-{name}", "reason"]


def test_a_png_bomb_is_quarantined_by_our_pixel_check_before_pillows(manifest, flickr, monkeypatch):
    """A 14 KB PNG declaring 60000x60000 pixels: Image.open itself would raise DecompressionBombError (above
    2 x Image.MAX_IMAGE_PIXELS), so it would be quarantined as image_decodes. It must fail our image_max_pixels check
    instead, with its declared size in the reason, and Pillow must neither run its bomb check on it nor decode it."""
    bomb = png_bomb(flickr / "images" / "bomb.png")
    assert 12_000 < bomb.stat().st_size < 16_000
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(Image.DecompressionBombError):  # what happened before: Pillow's guard, not ours
        Image.open(bomb)
    bomb_checked, loaded = [], []
    real_check, real_load = Image._decompression_bomb_check, ImageFile.ImageFile.load
    monkeypatch.setattr(Image, "_decompression_bomb_check", lambda size: bomb_checked.append(size) or real_check(size))
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loaded.append(self.size) or real_load(self))

    bad = manifest.copy()
    i = _row(bad, "en", "train")
    _with_new_image(bad, i, str(bomb))
    result = validate_manifest(bad, ValidationConfig())  # the default limit: 64,000,000 pixels
    q = result.quarantine
    assert q["failed_expectations"].tolist() == ["image_max_pixels"]
    reason = q["reason"].iloc[0]
    assert (f"image {bomb} is 60000x60000 = 3,600,000,000 pixels, more than max_image_pixels={DEFAULT_MAX_PIXELS:,}; "
            "it was not decoded") in reason
    assert "DecompressionBomb" not in reason
    with open(bomb, "rb") as handle:
        assert declared_size(handle) == (60_000, 60_000) and handle.tell() == 0
    with pytest.raises(ImageAccessError, match=r"60000x60000 = 3,600,000,000 pixels, more than the 64,000,000 allowed"):
        open_image(str(bomb), [str(flickr / "images")])
    assert (60_000, 60_000) not in bomb_checked and (60_000, 60_000) not in loaded
    assert loaded and bomb_checked  # the spies saw the other images, which were decoded with the guard on
    assert Image.MAX_IMAGE_PIXELS == limit


def test_bad_manifest_shape_is_an_error(manifest):
    with pytest.raises(DatasetFormatError, match=r"lacks columns \['image_root'\]"):
        validate_manifest(manifest.drop(columns=["image_root"]))
    with pytest.raises(DatasetFormatError, match=r"lacks columns \['lang'\]"):
        validate_manifest(manifest.drop(columns=["lang"]))
    typed = manifest.copy()
    typed["image_id"] = typed["image_id"].astype(object)
    typed.loc[5, "image_id"] = 5
    with pytest.raises(DatasetFormatError, match="manifest row 5 .* column image_id holds int"):
        validate_manifest(typed)
    with pytest.raises(DatasetFormatError, match="no rows"):
        validate_manifest(manifest.iloc[:0])
