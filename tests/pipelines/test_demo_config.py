"""The catalog's ``demo_config`` (globals) reaches the built-in dataset's generator: its conditions apply, and a bad
option stops the load with an error naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlalign.errors import ConfigError, find_vlalign_error
from vlalign_pipelines.datasets import ImageCaptionCorpusDataset


def _dataset(root: Path, demo_config: dict) -> ImageCaptionCorpusDataset:
    flickr = root / "flickr_demo"
    return ImageCaptionCorpusDataset(
        sources=[{"json": str(flickr / "dataset_demo.json"), "image_root": str(flickr / "images"), "lang": "en"}],
        demo_root=str(root), demo_config=demo_config)


def test_a_condition_in_demo_config_is_generated(tmp_path: Path) -> None:
    config = {"n_train": 10, "n_val": 2, "n_test": 2, "zero_shot_per_class": 1, "noise_fraction": 0.2}
    manifest = _dataset(tmp_path / "demo", config).load()
    assert len(manifest) == 14 * 5
    assert (tmp_path / "demo" / "flickr_demo" / "ground_truth.json").is_file()


def test_a_bad_option_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(Exception) as error:
        _dataset(tmp_path / "demo", {"near_duplicates": 2}).load()
    ours = find_vlalign_error(error.value)
    assert isinstance(ours, ConfigError) and "DemoConfig.near_duplicates=2" in str(ours)
    assert not (tmp_path / "demo").exists()
