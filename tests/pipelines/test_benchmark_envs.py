"""Benchmark Kedro environments and the catalog datasets behind them, on fixtures in the published formats."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlalign.data.fixtures import make_coco_cn_fixture, make_imagenet_fixture
from vlalign_pipelines.datasets import CocoCnDataset, ZeroShotSetDataset
from vlalign_pipelines.settings import CONFIG_LOADER_ARGS, RunConfigLoader

CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.mark.parametrize("env", ["flickr30k", "coco_cn", "imagenet"])
def test_env_config_resolves(env):
    loader = RunConfigLoader(str(CONF), env, **CONFIG_LOADER_ARGS)
    catalog, params = loader["catalog"], loader["parameters"]
    assert (CONF / env / "README.md").is_file()
    assert params["evaluation"].keys() >= {"split", "lang", "zero_shot_lang", "retrieval_dataset", "zero_shot_dataset"}
    assert {"raw_manifest", "zero_shot_set", "metrics"} <= set(catalog)
    if env != "imagenet":
        assert "01_raw/" + env in str(catalog["raw_manifest"])
    if env != "flickr30k":
        assert catalog["zero_shot_set"]["root"] == "data/01_raw/imagenet"


def test_coco_cn_dataset(tmp_path):
    fx = make_coco_cn_fixture(tmp_path / "coco_cn")
    manifest = CocoCnDataset(root=str(fx["root"]), image_roots=str(fx["image_roots"]), splits=["test"]).load()
    assert set(manifest["split"]) == {"test"} and set(manifest["lang"]) == {"zh"}


def test_zero_shot_flat_layout_with_package_classnames(tmp_path):
    pytest.importorskip("cn_clip")
    fx = make_imagenet_fixture(tmp_path / "imagenet", layout="flat")
    data = ZeroShotSetDataset(
        root=str(fx["root"]), layout="flat", labels_file="ILSVRC2012_validation_ground_truth.txt",
        label_index_base=1, label_wnids_file="devkit_wnids.txt",
        classnames={"en": "package:imagenet", "zh": "package:imagenet"},
        templates={"en": "package:imagenet", "zh": "package:imagenet"},
    ).load()
    assert data["images"]["label"].tolist() == fx["labels"]
    assert data["wnids"] == fx["wnids"]
    assert data["classnames"]["en"][:2] == ["tench", "goldfish"] and len(data["classnames"]["zh"]) == 1000
    assert len(data["templates"]["zh"]) == 80


def test_zero_shot_folder_layout_unchanged(tmp_path):
    fx = make_imagenet_fixture(tmp_path / "imagenet", layout="folder")
    (fx["root"] / "names.txt").write_text("tench\ngoldfish\ngreat white shark\n", encoding="utf-8")
    (fx["root"] / "templates.txt").write_text("a photo of a {}.\n", encoding="utf-8")
    data = ZeroShotSetDataset(root=str(fx["root"]), classnames={"en": "names.txt"}, templates={"en": "templates.txt"}).load()
    assert data["wnids"] == fx["wnids"] and len(data["images"]) == len(fx["labels"])
