"""The built-in dataset's high-resolution variant: a fill pattern that decides the caption and is visible only at
full resolution; the default dataset is unchanged by the option."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlalign.data import demo
from vlalign.data.demo import DemoConfig, PATTERNS, draw_image, generate_demo_dataset, swap_attribute_caption
from vlalign.errors import ConfigError

HIGHRES = DemoConfig(n_train=24, n_val=4, n_test=8, zero_shot_per_class=1, image_size=128, patterns=True)


@pytest.fixture(scope="module")
def highres_root(tmp_path_factory) -> Path:
    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "hi", HIGHRES)


def _downsample(image: Image.Image, size: int) -> np.ndarray:
    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), dtype=float)


def test_the_pattern_is_visible_only_at_full_resolution() -> None:
    attributes = {"colour": "red", "shape": "square", "size": "large", "position": "centre", "count": 1}
    images = {p: draw_image({**attributes, "pattern": p}, 128, 0.0, np.random.default_rng(0)) for p in PATTERNS}
    full = {p: np.asarray(im, dtype=float) for p, im in images.items()}
    low = {p: _downsample(im, 64) for p, im in images.items()}
    shape = np.abs(full["striped"] - np.array(demo.BACKGROUND_RGB)).max(axis=2) > 60  # (128, 128)
    full_gap = np.abs(full["striped"] - full["checked"]).max(axis=2)[shape].mean()
    low_gap = np.abs(low["striped"] - low["checked"]).max(axis=2)[shape[::2, ::2]].mean()
    assert full_gap > 90  # half of the shape's pixels flip between red (220) and near-black (20)
    assert low_gap < 0.1 * full_gap  # at the tower's 64 pixels the two patterns are nearly the same picture
    flat = np.asarray(draw_image(attributes, 128, 0.0, np.random.default_rng(0)), dtype=float)
    assert np.abs(flat - full["striped"]).max() > 100  # patterned shapes differ from the plain demo's


def test_captions_name_the_pattern_and_near_misses_can_differ_in_it_alone(highres_root: Path) -> None:
    entries = json.loads((highres_root / "flickr_demo" / "dataset_demo.json").read_text())["images"]
    for entry in entries:
        pattern = entry["attributes"]["pattern"]
        assert pattern in PATTERNS
        assert all(f"{pattern} {entry['attributes']['colour']}" in s["raw"].lower() for s in entry["sentences"])
    assert Image.open(highres_root / "flickr_demo" / "images" / entries[0]["filename"]).size == (128, 128)
    changed = {e["near_miss"]["changed"] for e in entries if e["near_miss"]}
    assert changed <= {*demo.ATTRIBUTES, "pattern"}
    true, swapped = swap_attribute_caption(entries[0]["attributes"], "pattern", random.Random(0))
    other = next(p for p in PATTERNS if p != entries[0]["attributes"]["pattern"])
    assert true.replace(entries[0]["attributes"]["pattern"], other) == swapped
    with pytest.raises(ConfigError, match="the pattern exists only in the high-resolution variant"):
        swap_attribute_caption({k: v for k, v in entries[0]["attributes"].items() if k != "pattern"}, "pattern",
                               random.Random(0))


def test_the_default_dataset_keeps_its_hash_and_marker() -> None:
    """The option is recorded only when on: the default config hashes as before the option (and the later
    conditions) existed."""
    config = DemoConfig()
    old_payload = {"generator_version": demo.GENERATOR_VERSION,
                   **{k: v for k, v in dataclasses.asdict(config).items() if k not in demo._LATER_FIELDS}}
    old_hash = hashlib.sha256(json.dumps(old_payload, sort_keys=True).encode("utf-8")).hexdigest()
    assert config.config_hash() == old_hash and "patterns" not in config.recorded()
    assert HIGHRES.recorded()["patterns"] is True and HIGHRES.config_hash() != dataclasses.replace(
        HIGHRES, patterns=False).config_hash()
