"""The built-in dataset's writer as it was before the controlled conditions (commit 42a5985), kept verbatim so that a
test can check that the default options still write the same files, byte for byte, on any machine."""

# ruff: noqa
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from vlalign.data.demo import (
    ATTRIBUTES, PATTERN_ATTRIBUTE, DemoConfig, _EN_TEMPLATES, _ZH_COLOUR, _ZH_COUNT, _ZH_POSITION, _ZH_SHAPE,
    _ZH_SIZE, _ZH_TEMPLATES, _attribute_values, _en_slots, _en_tokens, _random_attributes, _random_choices,
    _zh_tokens, draw_image,
)


def _finish_en(text: str, rng: random.Random) -> str:
    """Capitalise and end with a full stop half of the time, as human captions vary."""
    if rng.random() < 0.5:
        return text[0].upper() + text[1:] + "."
    return text


def english_captions(attributes: dict, n: int, rng: random.Random) -> list[str]:
    """Return ``n`` English captions of ``attributes``, each from a different template."""
    templates = rng.sample(_EN_TEMPLATES, n)
    return [_finish_en(t.format(**_en_slots(attributes, _random_choices(rng))), rng) for t in templates]


def chinese_captions(attributes: dict, n: int, rng: random.Random) -> list[str]:
    """Return ``n`` Chinese captions of ``attributes``, each from a different template."""
    captions = []
    for template in rng.sample(_ZH_TEMPLATES, n):
        sizes = _ZH_SIZE[attributes["size"]]
        positions = _ZH_POSITION[attributes["position"]]
        text = template.format(
            pos=positions[rng.randrange(len(positions))],
            count=_ZH_COUNT[int(attributes["count"])],
            size=sizes[rng.randrange(len(sizes))],
            colour=_ZH_COLOUR[attributes["colour"]],
            shape=_ZH_SHAPE[attributes["shape"]],
        )
        captions.append(text + ("。" if rng.random() < 0.5 else ""))
    return captions



def _write_flickr(out: Path, config: DemoConfig, np_rng: np.random.Generator, py_rng: random.Random) -> None:
    images_dir = out / "flickr_demo" / "images"
    images_dir.mkdir(parents=True)
    splits = ["train"] * config.n_train + ["val"] * config.n_val + ["test"] * config.n_test
    n_images = len(splits)
    entries_en, entries_zh = [], []
    previous: dict | None = None
    for imgid, split in enumerate(splits):
        near_miss = None
        if previous is not None and previous["split"] == split and np_rng.random() < config.near_miss_fraction:
            changed = str(np_rng.choice(ATTRIBUTES + ((PATTERN_ATTRIBUTE,) if config.patterns else ())))
            attributes = dict(previous["attributes"])
            attributes[changed] = py_rng.choice([v for v in _attribute_values(changed) if v != attributes[changed]])
            near_miss = {"of": previous["imgid"], "changed": changed}
        else:
            attributes = _random_attributes(np_rng, config.patterns)
        filename = f"{imgid:06d}.png"
        draw_image(attributes, config.image_size, config.noise_std, np_rng).save(images_dir / filename)
        for lang, entries, captions, tokens, first_sentid in (
            ("en", entries_en, english_captions(attributes, config.captions_en, py_rng), _en_tokens,
             imgid * config.captions_en),
            ("zh", entries_zh, chinese_captions(attributes, config.captions_zh, py_rng), _zh_tokens,
             n_images * config.captions_en + imgid * config.captions_zh),
        ):
            sentids = [first_sentid + k for k in range(len(captions))]
            entry = {
                "filename": filename,
                "imgid": imgid,
                "split": split,
                "sentids": sentids,
                "sentences": [
                    {"tokens": tokens(raw), "raw": raw, "imgid": imgid, "sentid": sid}
                    for raw, sid in zip(captions, sentids)
                ],
                "attributes": attributes,
                "near_miss": near_miss,
            }
            entries.append(entry)
        previous = {"split": split, "attributes": attributes, "imgid": imgid}
    for name, entries in (("dataset_demo.json", entries_en), ("dataset_demo_zh.json", entries_zh)):
        payload = {"images": entries, "dataset": "flickr_demo"}
        (out / "flickr_demo" / name).write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")

