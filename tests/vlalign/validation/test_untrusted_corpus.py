"""A corpus is untrusted input: every kind of bad entry and bad image reference is quarantined with a reason,
nothing outside the corpus's image roots is read, and input = clean + quarantined (printed and logged to MLflow)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from PIL import Image

from vlalign.data.datasets import ImageTextDataset
from vlalign.data.demo import DemoConfig, generate_demo_dataset
from vlalign.data.fixtures import make_coco_cn_fixture
from vlalign.data.formats import load_coco_cn, load_corpus
from vlalign.errors import DatasetFormatError
from vlalign.models import build_tokenizer_for, build_transform, get_model_config
from vlalign_pipelines.pipelines.validation.nodes import validate_corpus

CONFIG = {"min_words_en": 3, "min_chars_zh": 4, "min_image_size": 32, "max_rejected_fraction": 1.0,
          "check_images": True, "max_image_pixels": 100_000}


def _poison(root: Path, outside: Path) -> dict[str, str]:
    """Rewrite the tiny demo corpus under ``root`` with one bad entry of every kind; return entry -> expected rule."""
    flickr = root / "flickr_demo"
    images = flickr / "images"
    data = json.loads((flickr / "dataset_demo.json").read_text(encoding="utf-8"))
    entries = data["images"]
    good_png = (images / entries[0]["filename"]).read_bytes()
    (outside / "valid.png").write_bytes(good_png)  # a valid image outside the corpus
    (images / "link.png").symlink_to(outside / "valid.png")  # ...and a link to it inside the image folder
    os.mkfifo(images / "fifo.png")
    (images / "folder.png").mkdir()
    Image.new("RGB", (400, 400), (9, 9, 9)).save(images / "huge.png")
    (images / "truncated.png").write_bytes(good_png[: len(good_png) // 2])
    expected = {}

    def entry(i: int, rule: str, **changes) -> None:
        entries[i].update(changes)
        expected[f"dataset_demo.json:images[{i}]"] = rule

    entry(1, "image_inside_root", filename="/etc/hostname")
    entry(2, "image_inside_root", filename="../../../outside/valid.png")
    entry(3, "image_inside_root", filename="link.png")
    entry(4, "image_regular_file", filename="fifo.png")
    entry(5, "image_regular_file", filename="folder.png")
    entry(6, "image_max_pixels", filename="huge.png")
    entry(7, "image_decodes", filename="truncated.png")
    entry(8, "image_exists", filename="missing.png")
    del entries[9]["sentences"]
    expected["dataset_demo.json:images[9]"] = "entry_well_formed"
    entry(10, "entry_well_formed", imgid=entries[0]["imgid"])  # a duplicate id: quarantined, not merged
    entry(11, "entry_well_formed", split="dev")
    entries[12]["sentences"][1]["raw"] = 12345  # one caption that is a number: that caption only
    entries.append("not an object")
    expected[f"dataset_demo.json:images[{len(entries) - 1}]"] = "entry_well_formed"
    (flickr / "dataset_demo.json").write_text(json.dumps(data), encoding="utf-8")
    return expected


@pytest.fixture()
def corpus(tmp_path: Path) -> tuple[pd.DataFrame, dict[str, str], Path]:
    root = generate_demo_dataset(tmp_path / "demo", DemoConfig(n_train=16, n_val=4, n_test=4, zero_shot_per_class=1))
    (tmp_path / "outside").mkdir()
    expected = _poison(root, tmp_path / "outside")
    images = root / "flickr_demo" / "images"
    manifest = load_corpus([{"json": root / "flickr_demo" / "dataset_demo.json", "image_root": images, "lang": "en"}])
    return manifest, expected, tmp_path


def test_every_bad_entry_is_quarantined_with_its_reason_and_counted(corpus, caplog, monkeypatch):
    manifest, expected, tmp_path = corpus
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("untrusted-corpus")  # not an experiment id left over from another test's store
    caplog.set_level(logging.INFO)
    try:
        with mlflow.start_run() as run:
            clean, quarantine, report = validate_corpus(manifest, {"config": CONFIG, "data_docs_dir": str(tmp_path / "docs")})
        logged = mlflow.get_run(run.info.run_id).data.metrics
    finally:
        mlflow.set_tracking_uri(None)

    # every bad entry is quarantined, for exactly the expected reason, and nothing else is
    by_entry = quarantine.groupby("entry")["failed_expectations"].agg(set)
    caption_only = "dataset_demo.json:images[12]"
    assert set(by_entry.index) == set(expected) | {caption_only}
    for entry, rule in expected.items():
        assert by_entry[entry] == {rule}, (entry, by_entry[entry])
    assert quarantine.loc[quarantine["entry"] == caption_only, "source"].tolist() == [
        "dataset_demo.json:images[12].sentences[1]"]
    reasons = quarantine.set_index("entry")["reason"]
    images = os.path.realpath(manifest["image_path"].dropna().iloc[0].rsplit("/", 1)[0])
    assert "/etc/hostname is outside the image root " + images in reasons["dataset_demo.json:images[1]"].iloc[0]
    assert "resolves to " + os.path.realpath(tmp_path / "outside" / "valid.png") in reasons["dataset_demo.json:images[3]"].iloc[0]
    assert "images[9].sentences is missing; expected a non-empty list" in reasons["dataset_demo.json:images[9]"]
    assert "repeats the imgid of images[0]" in reasons["dataset_demo.json:images[10]"].iloc[0]
    assert "sentences[1].raw is 12345; expected a string" in reasons[caption_only]

    # nothing is lost: input = clean + quarantined, for rows and for entries; printed and logged to MLflow
    counts = report["counts"]
    n_entries = 16 + 4 + 4 + 1
    n_rows = 5 * (16 + 4 + 4) - 5 + 1 + 1  # entry 9 lost its sentences (one row), the appended string (one row)
    assert counts["rows"] == {"input": n_rows, "clean": len(clean), "quarantined": len(quarantine)}
    assert len(clean) + len(quarantine) == len(manifest) == n_rows
    assert counts["entries"] == {"input": n_entries, "clean": n_entries - len(expected) - 1,
                                 "partly_quarantined": 1, "quarantined": len(expected)}
    assert f"validation: {n_rows} rows = {len(clean)} clean + {len(quarantine)} quarantined" in caplog.text
    assert logged["validation.rows.input"] == n_rows and logged["validation.rows.quarantined"] == len(quarantine)
    assert logged["validation.entries.quarantined"] == len(expected)

    # the link to a valid image outside the corpus is not trained on
    assert not clean["image_path"].str.endswith(("link.png", "valid.png", "hostname")).any()


def test_training_refuses_an_image_outside_its_roots_even_without_validation(corpus):
    manifest, _, _ = corpus
    cfg = get_model_config("tiny-vit-bert")
    rows = manifest[manifest["entry"] == "dataset_demo.json:images[3]"]  # the link to the image outside
    with pytest.raises(DatasetFormatError, match="outside the image root"):
        ImageTextDataset(rows, build_transform(cfg, train=True), build_tokenizer_for(cfg), 32, ["en"])


def test_linked_coco_folders_work_but_a_linked_file_is_refused(tmp_path):
    """COCO-CN's README suggests linking COCO's train2014/ and val2014/ into the image folder: that works, on
    purpose; a link to a single file outside is still quarantined."""
    fx = make_coco_cn_fixture(tmp_path / "coco_cn")
    elsewhere = tmp_path / "big_disk"
    for folder in ("train2014", "val2014"):
        shutil.move(fx["image_roots"] / folder, elsewhere / folder)
        (fx["image_roots"] / folder).symlink_to(elsewhere / folder, target_is_directory=True)
    stray = tmp_path / "stray.jpg"
    shutil.copy(next((elsewhere / "val2014").glob("*.jpg")), stray)
    target = fx["image_roots"] / "val2014" / "COCO_val2014_000000000164.jpg"
    (elsewhere / "val2014" / target.name).unlink()
    (elsewhere / "val2014" / target.name).symlink_to(stray)  # a file link inside the linked folder
    manifest = load_coco_cn(fx["root"], fx["image_roots"])
    clean, quarantine, _ = validate_corpus(manifest, {"config": {**CONFIG, "min_chars_zh": 1},
                                                      "data_docs_dir": str(tmp_path / "docs")})
    assert quarantine["image_id"].tolist() == ["COCO_val2014_000000000164"]
    assert quarantine["failed_expectations"].tolist() == ["image_inside_root"]
    assert f"resolves to {stray.resolve()}" in quarantine["reason"].iloc[0]
    assert clean["image_id"].nunique() == 6  # the other images, read through the linked folders
