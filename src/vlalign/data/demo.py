"""Default dataset: a small synthetic image-caption corpus that is generated, never downloaded.

Each image shows 1-3 copies of one coloured shape drawn with PIL on a lightly noised grey
background. The attributes (colour, shape, size, position, count) are described by English and
Chinese captions from small grammars, so retrieval has to tell images apart by attributes;
near-miss images (a copy of the previous image with exactly one attribute changed) are mixed in
on purpose. The same drawer makes a zero-shot classification set in ImageNet folder layout whose
classes are the colour x shape combinations.

The high-resolution variant (``DemoConfig(patterns=True, image_size=128)``, the ``demo_highres`` environment)
fills every shape with a fine pattern, ``striped`` (1-pixel horizontal stripes) or ``checked`` (a 1-pixel
checkerboard) of the shape's colour and near-black, and names it in the English captions ("a small striped red
circle"). Both patterns have the same mean colour, so an image downsampled by 2 (e.g. to a 64-pixel tower)
shows the same flat, darker shape for both: the pattern, which decides the caption, is visible only at full
resolution (e.g. in the sub-image tiles of :mod:`vlalign.models.mixed`). Near misses can differ in the pattern
alone. The Chinese captions do not name it (the demo vocabulary has no characters for it).

Layout (see docs/INTERFACES.md section 2)::

    root/flickr_demo/images/000123.png
    root/flickr_demo/dataset_demo.json      Karpathy format, English
    root/flickr_demo/dataset_demo_zh.json   Karpathy format, Chinese, same imgid/filename
    root/imagenet_demo/val/<wnid>/<n>.png
    root/imagenet_demo/{wnids,classnames_en,classnames_zh,templates_en,templates_zh}.txt
    root/DONE                               JSON: generator version, config, config hash
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vlalign.errors import ConfigError

#: Bump when the generator's output changes, so existing datasets are regenerated.
GENERATOR_VERSION = 1

# --------------------------------------------------------------------------------------------
# Attribute vocabulary
# --------------------------------------------------------------------------------------------

#: colour name -> RGB fill. Chosen to be far apart from each other and from the grey background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 75, 225),
    "yellow": (245, 225, 30),
    "purple": (145, 45, 185),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "centre")
COUNTS: tuple[int, ...] = (1, 2, 3)
#: Attribute names, in the order of the ``attributes`` dict stored for each image.
ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size", "position", "count")
#: Fill patterns of the high-resolution variant (``DemoConfig.patterns``): equal mean colour, different texture.
PATTERNS: tuple[str, ...] = ("striped", "checked")
#: The attribute the high-resolution variant adds (after :data:`ATTRIBUTES` in each image's ``attributes``).
PATTERN_ATTRIBUTE = "pattern"
#: Colour of the pattern's other half (the shape's colour fills the rest).
PATTERN_DARK_RGB = (20, 20, 20)

BACKGROUND_RGB = (118, 118, 118)

# English surface forms ------------------------------------------------------------------------
_EN_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
_EN_SIZE = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
_EN_COUNT = {1: "one", 2: "two", 3: "three"}
_EN_POSITION = {
    "left": ("on the left", "on the left side", "at the left of the picture"),
    "right": ("on the right", "on the right side", "at the right of the picture"),
    "top": ("at the top", "near the top of the image", "at the top of the picture"),
    "bottom": ("at the bottom", "near the bottom of the image", "at the bottom of the picture"),
    "centre": ("in the centre", "in the middle", "in the middle of the picture"),
}
#: Caption templates. Slots: {np} = count + colour + shape, {np_size} = count + size + colour +
#: shape, {pos} position phrase, {be} is/are, {the_shape} "the circle(s)", {colour}, {size}.
#: Every template mentions colour and shape; they differ in whether size/position are mentioned.
_EN_TEMPLATES: tuple[str, ...] = (
    "{np_size} {pos}",
    "there {be} {np} {pos}",
    "{np_size} on a grey background",
    "a picture of {np} {pos}",
    "an image showing {np_size}",
    "{np} drawn {pos}",
    "{the_shape} {be} {colour} and {size}",
    "{np_size} {be} {pos}",
    "a simple drawing with {np}",
    "{pos}, there {be} {np_size}",
)
#: Template that mentions every attribute; used for attribute-swap probes.
_EN_FULL_TEMPLATE = "{np_size} {pos}"

# Chinese surface forms ------------------------------------------------------------------------
_ZH_COLOUR = {
    "red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色",
    "purple": "紫色", "orange": "橙色", "white": "白色",
}
_ZH_SHAPE = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形", "cross": "十字形"}
_ZH_SIZE = {"small": ("小", "很小"), "large": ("大", "很大")}
_ZH_COUNT = {1: "一个", 2: "两个", 3: "三个"}
_ZH_POSITION = {
    "left": ("左边", "左侧"),
    "right": ("右边", "右侧"),
    "top": ("上方", "顶部"),
    "bottom": ("下方", "底部"),
    "centre": ("中间", "正中"),
}
#: Chinese templates; same slots as English ({size} is an adjective used with 的).
_ZH_TEMPLATES: tuple[str, ...] = (
    "{pos}有{count}{size}的{colour}{shape}",
    "图片{pos}是{count}{colour}的{shape}",
    "{count}{size}的{colour}{shape}位于画面{pos}",
    "灰色背景上有{count}{colour}{shape}",
    "这张图里画着{count}{size}的{colour}{shape}",
    "在图片的{pos}，可以看到{count}{colour}{shape}",
)

# Zero-shot class names and prompt templates ------------------------------------------------------
ZERO_SHOT_TEMPLATES_EN: tuple[str, ...] = (
    "a photo of the {}.",
    "a drawing of the {}.",
    "a picture showing the {}.",
    "the {} on a grey background.",
    "an image containing the {}.",
    "this is the {}.",
)
ZERO_SHOT_TEMPLATES_ZH: tuple[str, ...] = (
    "一张{}的照片。",
    "一幅{}的图画。",
    "灰色背景上的{}。",
    "图片里有一个{}。",
    "这是一个{}。",
    "一张包含{}的图片。",
)


@dataclass(frozen=True)
class DemoConfig:
    """What :func:`generate_demo_dataset` draws. Its hash decides whether a dataset is reused."""

    image_size: int = 64  # side of the square RGB images, in pixels
    n_train: int = 2000  # images in the Karpathy "train" split
    n_val: int = 200  # images in the "val" split
    n_test: int = 500  # images in the "test" split
    captions_en: int = 5  # English captions per image (dataset_demo.json), at most 10 (one per template)
    captions_zh: int = 2  # Chinese captions per image (dataset_demo_zh.json), at most 6
    zero_shot_per_class: int = 20  # zero-shot images per colour x shape class (imagenet_demo/val)
    near_miss_fraction: float = 0.3  # probability that an image copies the previous one with one attribute changed
    noise_std: float = 4.0  # std of the per-pixel Gaussian noise added to each image (0-255 scale)
    seed: int = 0  # seed of every random choice; same seed -> byte-identical files
    patterns: bool = False  # high-resolution variant: shapes filled striped/checked (1-px), named in the captions

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first field out of range."""
        checks = [
            ("image_size", self.image_size >= 16, "an integer >= 16"),
            ("n_train", self.n_train >= 1, "an integer >= 1"),
            ("n_val", self.n_val >= 0, "an integer >= 0"),
            ("n_test", self.n_test >= 0, "an integer >= 0"),
            ("captions_en", 1 <= self.captions_en <= len(_EN_TEMPLATES), f"between 1 and {len(_EN_TEMPLATES)}"),
            ("captions_zh", 1 <= self.captions_zh <= len(_ZH_TEMPLATES), f"between 1 and {len(_ZH_TEMPLATES)}"),
            ("zero_shot_per_class", self.zero_shot_per_class >= 1, "an integer >= 1"),
            ("near_miss_fraction", 0.0 <= self.near_miss_fraction <= 1.0, "a probability in [0, 1]"),
            ("noise_std", self.noise_std >= 0.0, "a non-negative number"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"DemoConfig.{name}={getattr(self, name)!r}: expected {expected}.")

    def recorded(self) -> dict:
        """The fields that identify the dataset: every field, except those added later while at their default, so
        the default dataset keeps its hash and its DONE marker byte for byte."""
        return {k: v for k, v in dataclasses.asdict(self).items() if not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])}

    def config_hash(self) -> str:
        """Hex digest identifying this config and the generator version."""
        payload = json.dumps({"generator_version": GENERATOR_VERSION, **self.recorded()}, sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


#: DemoConfig fields added after the first release, with the default that leaves the output unchanged.
_LATER_FIELDS = {"patterns": False}


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _en_slots(attributes: dict, choices: dict[str, int]) -> dict[str, str]:
    """Fill the English template slots for ``attributes`` with the surface-form ``choices``."""
    colour, shape, count = attributes["colour"], attributes["shape"], int(attributes["count"])
    if attributes.get(PATTERN_ATTRIBUTE):  # high-resolution variant: "striped red" is the colour phrase
        colour = f"{attributes[PATTERN_ATTRIBUTE]} {colour}"
    size_words = _EN_SIZE[attributes["size"]]
    size = size_words[choices["size"] % len(size_words)]
    pos_phrases = _EN_POSITION[attributes["position"]]
    pos = pos_phrases[choices["pos"] % len(pos_phrases)]
    noun = shape if count == 1 else _EN_PLURAL[shape]
    if count == 1 and choices["article"] % 2 == 0:
        np_plain = f"{_article(colour)} {colour} {noun}"
        np_size = f"{_article(size)} {size} {colour} {noun}"
    else:
        np_plain = f"{_EN_COUNT[count]} {colour} {noun}"
        np_size = f"{_EN_COUNT[count]} {size} {colour} {noun}"
    return {
        "np": np_plain,
        "np_size": np_size,
        "pos": pos,
        "be": "is" if count == 1 else "are",
        "the_shape": f"the {noun}",
        "colour": colour,
        "size": size,
    }


def _random_choices(rng: random.Random) -> dict[str, int]:
    """Wording choices for :func:`_en_slots`; indices are taken modulo the number of variants
    (6 is a multiple of 2 and 3, so every variant is equally likely)."""
    return {"size": rng.randrange(6), "pos": rng.randrange(6), "article": rng.randrange(2)}


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


#: The one template of the synthetic ("captioner") style, per language: terse, always every attribute, and unlike
#: any human caption template above (see :func:`templated_caption`).
SYNTHETIC_TEMPLATE_EN = "a photo of {np_size} {pos}"
SYNTHETIC_TEMPLATE_ZH = "一张照片：{pos}有{count}{size}的{colour}{shape}"


def templated_caption(attributes: dict, lang: str, rng: random.Random) -> str:
    """A caption of ``attributes`` in the synthetic style (a fixed template naming every attribute, as a simple
    captioner writes), in ``lang`` (``en`` or ``zh``); the wording variants are drawn with ``rng``."""
    if lang == "en":
        return SYNTHETIC_TEMPLATE_EN.format(**_en_slots(attributes, _random_choices(rng)))
    if lang == "zh":
        sizes, positions = _ZH_SIZE[attributes["size"]], _ZH_POSITION[attributes["position"]]
        return SYNTHETIC_TEMPLATE_ZH.format(
            pos=positions[rng.randrange(len(positions))], count=_ZH_COUNT[int(attributes["count"])],
            size=sizes[rng.randrange(len(sizes))], colour=_ZH_COLOUR[attributes["colour"]],
            shape=_ZH_SHAPE[attributes["shape"]],
        )
    raise ConfigError(f"templated_caption: lang={lang!r}; the built-in grammar has en and zh.")


def corrupt_attribute(attributes: dict, rng: random.Random) -> dict:
    """A copy of ``attributes`` with one attribute (uniformly chosen among those present) set to another value:
    a captioner's mistake."""
    which = rng.choice([a for a in (*ATTRIBUTES, PATTERN_ATTRIBUTE) if a in attributes])
    wrong = dict(attributes)
    wrong[which] = rng.choice([v for v in _attribute_values(which) if v != attributes[which]])
    return wrong


def _attribute_values(which: str) -> tuple:
    values = {"colour": tuple(COLOURS), "shape": SHAPES, "size": SIZES, "position": POSITIONS, "count": COUNTS,
              PATTERN_ATTRIBUTE: PATTERNS}
    if which not in values:
        raise ConfigError(f"attribute {which!r} is unknown; expected one of {[*ATTRIBUTES, PATTERN_ATTRIBUTE]}.")
    return values[which]


def swap_attribute_caption(attributes: dict, which: str, rng: random.Random) -> tuple[str, str]:
    """Return ``(true_caption, swapped_caption)`` in English for a compositional probe.

    Both captions use the template that mentions every attribute and the same wording choices;
    they differ only in attribute ``which`` (one of :data:`ATTRIBUTES`), which the swapped caption
    sets to another value drawn with ``rng``.
    """
    values = _attribute_values(which)
    if which not in attributes:
        raise ConfigError(f"attribute {which!r} cannot be swapped: this image has only {sorted(attributes)} "
                          "(the pattern exists only in the high-resolution variant, DemoConfig(patterns=True)).")
    swapped = dict(attributes)
    swapped[which] = rng.choice([v for v in values if v != attributes[which]])
    choices = _random_choices(rng)
    return (
        _EN_FULL_TEMPLATE.format(**_en_slots(attributes, choices)),
        _EN_FULL_TEMPLATE.format(**_en_slots(swapped, choices)),
    )


def class_names() -> list[tuple[str, str, str]]:
    """Zero-shot classes as ``(wnid, English name, Chinese name)``, in class-index order."""
    classes = []
    for colour in COLOURS:
        for shape in SHAPES:
            index = len(classes)
            classes.append((f"n9{index + 1:07d}", f"{colour} {shape}", _ZH_COLOUR[colour] + _ZH_SHAPE[shape]))
    return classes


# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------

_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_PUNCTUATION = tuple(".,!?;:'\"()-/") + tuple("。，！？；：、（）")
_SLOT = re.compile(r"\{\w*\}")


def demo_vocabulary() -> list[str]:
    """Return the lines of ``assets/demo_vocab.txt``: a BERT WordPiece vocabulary for the demo.

    Order: the special tokens ([PAD] = id 0), the English words of every caption template, filler,
    class name and prompt template, the Chinese characters of the Chinese ones, then fallbacks
    (a-z, 0-9, ##a-##z, ##0-##9) and punctuation, so that any lowercase ASCII text tokenizes
    without [UNK].
    """
    english: set[str] = set()
    en_texts = list(_EN_TEMPLATES) + list(ZERO_SHOT_TEMPLATES_EN) + list(COLOURS) + list(SHAPES)
    en_texts += list(_EN_PLURAL.values()) + list(_EN_COUNT.values()) + ["a", "an", "is", "are", "the"]
    en_texts += [w for words in _EN_SIZE.values() for w in words]
    en_texts += [p for phrases in _EN_POSITION.values() for p in phrases]
    for text in en_texts:
        english.update(re.findall(r"[a-z0-9]+", _SLOT.sub(" ", text).lower()))

    chinese: set[str] = set()
    zh_texts = list(_ZH_TEMPLATES) + list(ZERO_SHOT_TEMPLATES_ZH) + list(_ZH_COLOUR.values())
    zh_texts += list(_ZH_SHAPE.values()) + list(_ZH_COUNT.values())
    zh_texts += [w for words in _ZH_SIZE.values() for w in words]
    zh_texts += [p for phrases in _ZH_POSITION.values() for p in phrases]
    for text in zh_texts:
        chinese.update(ch for ch in _SLOT.sub("", text) if "\u4e00" <= ch <= "\u9fff")

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    digits = [str(d) for d in range(10)]
    tokens = list(_SPECIAL_TOKENS) + sorted(english) + sorted(chinese) + letters + digits
    tokens += ["##" + ch for ch in letters + digits] + list(_PUNCTUATION)
    return list(dict.fromkeys(tokens))  # drop repeats (single-letter words such as "a"), keep order


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.42 * r
            angle = -np.pi / 2 + k * np.pi / 5
            points.append((cx + radius * np.cos(angle), cy + radius * np.sin(angle)))
        return points
    if shape == "cross":
        a = 0.36 * r
        return [
            (cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a), (cx + r, cy + a),
            (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r), (cx - a, cy + a), (cx - r, cy + a),
            (cx - r, cy - a), (cx - a, cy - a),
        ]
    raise ValueError(f"no polygon for shape {shape!r}")


def _object_centres(
    attributes: dict, size_px: int, radius: float, rng: np.random.Generator
) -> list[tuple[float, float]]:
    """Centres of the ``count`` objects, lined up inside the region named by ``position``."""
    anchor = {
        "left": (0.22, 0.5), "right": (0.78, 0.5), "top": (0.5, 0.22),
        "bottom": (0.5, 0.78), "centre": (0.5, 0.5),
    }[attributes["position"]]
    count = int(attributes["count"])
    spacing = 2.4 * radius
    offsets = [(k - (count - 1) / 2) * spacing for k in range(count)]
    vertical = attributes["position"] in ("left", "right")  # stack along the free axis
    jitter = rng.uniform(-0.03, 0.03, size=2) * size_px
    centres = []
    for off in offsets:
        x = anchor[0] * size_px + jitter[0] + (0.0 if vertical else off)
        y = anchor[1] * size_px + jitter[1] + (off if vertical else 0.0)
        centres.append((x, y))
    return centres


def pattern_mask(pattern: str, size_px: int) -> np.ndarray:
    """(size_px, size_px) bool: where a patterned shape shows its colour (elsewhere :data:`PATTERN_DARK_RGB`).

    ``striped``: every other row; ``checked``: a 1-pixel checkerboard. Both cover exactly half of the pixels in
    every 2 x 2 block, so averaging over 2 x 2 (or any coarser) pixels gives the same colour for both.
    """
    y, x = np.mgrid[0:size_px, 0:size_px]  # (H, W) each
    if pattern == "striped":
        return y % 2 == 0
    if pattern == "checked":
        return (x + y) % 2 == 0
    raise ConfigError(f"pattern {pattern!r} is unknown; expected one of {list(PATTERNS)}.")


def draw_image(attributes: dict, size_px: int, noise_std: float, rng: np.random.Generator) -> Image.Image:
    """Draw ``attributes`` (see :data:`ATTRIBUTES`, plus ``pattern`` in the high-resolution variant) as an RGB image
    of ``size_px`` x ``size_px``."""
    image = Image.new("RGB", (size_px, size_px), BACKGROUND_RGB)
    pattern = attributes.get(PATTERN_ATTRIBUTE)
    canvas = Image.new("L", (size_px, size_px), 0) if pattern else image  # patterned: draw the shapes' mask first
    draw = ImageDraw.Draw(canvas)
    radius = size_px * (0.07 if attributes["size"] == "small" else 0.13)
    fill = 255 if pattern else COLOURS[attributes["colour"]]
    for cx, cy in _object_centres(attributes, size_px, radius, rng):
        if attributes["shape"] == "circle":
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
        elif attributes["shape"] == "square":
            half = 0.85 * radius
            draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
        else:
            draw.polygon(_shape_polygon(attributes["shape"], cx, cy, radius), fill=fill)
    if pattern:
        inside = np.asarray(canvas) > 127  # (H, W) the shapes
        lit = pattern_mask(pattern, size_px)  # (H, W)
        pixels = np.asarray(image).copy()  # (H, W, 3)
        pixels[inside & lit] = COLOURS[attributes["colour"]]
        pixels[inside & ~lit] = PATTERN_DARK_RGB
        image = Image.fromarray(pixels, "RGB")
    if noise_std > 0:
        pixels = np.asarray(image, dtype=np.float32)  # (H, W, 3)
        pixels = pixels + rng.normal(0.0, noise_std, size=pixels.shape)
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    return image


def _random_attributes(rng: np.random.Generator, patterns: bool = False) -> dict:
    attributes = {
        "colour": str(rng.choice(list(COLOURS))),
        "shape": str(rng.choice(SHAPES)),
        "size": str(rng.choice(SIZES)),
        "position": str(rng.choice(POSITIONS)),
        "count": int(rng.choice(COUNTS)),
    }
    if patterns:  # drawn last, so the default dataset's random stream is unchanged
        attributes[PATTERN_ATTRIBUTE] = str(rng.choice(PATTERNS))
    return attributes


# --------------------------------------------------------------------------------------------
# Dataset writer
# --------------------------------------------------------------------------------------------


def _en_tokens(raw: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", raw.lower())


def _zh_tokens(raw: str) -> list[str]:
    return [ch for ch in raw if "\u4e00" <= ch <= "\u9fff"]


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


def _write_imagenet(out: Path, config: DemoConfig, np_rng: np.random.Generator) -> None:
    base = out / "imagenet_demo"
    classes = class_names()
    for wnid, name_en, _ in classes:
        colour, shape = name_en.split(" ")
        class_dir = base / "val" / wnid
        class_dir.mkdir(parents=True)
        for k in range(config.zero_shot_per_class):
            attributes = {**_random_attributes(np_rng, config.patterns), "colour": colour, "shape": shape}
            draw_image(attributes, config.image_size, config.noise_std, np_rng).save(class_dir / f"{k:04d}.png")
    files = {
        "wnids.txt": [c[0] for c in classes],
        "classnames_en.txt": [c[1] for c in classes],
        "classnames_zh.txt": [c[2] for c in classes],
        "templates_en.txt": list(ZERO_SHOT_TEMPLATES_EN),
        "templates_zh.txt": list(ZERO_SHOT_TEMPLATES_ZH),
    }
    for name, lines in files.items():
        (base / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _read_done(root: Path) -> dict | None:
    """Return the parsed ``DONE`` marker of ``root``, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((root / "DONE").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _remove_stale_temp_dirs(root: Path) -> None:
    """Delete temp dirs left next to ``root`` by generator runs whose process no longer exists."""
    for path in root.parent.glob(f".{root.name}.*-pid*-*"):
        match = re.search(r"-pid(\d+)-", path.name)
        if match is None or not path.is_dir():
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # the process exists but belongs to someone else
            continue


def generate_demo_dataset(root: Path, config: DemoConfig | None = None) -> Path:
    """Generate the default dataset under ``root`` (layout in the module docstring) and return ``root``.

    - Deterministic: the same config gives byte-identical files.
    - Idempotent: when ``root/DONE`` records the same config hash, returns at once.
    - Atomic: builds in a temp dir next to ``root`` and renames it into place, so an interrupted run
      never leaves a half-written dataset. A previous demo dataset (one with a ``DONE`` marker) with
      another config is replaced; a non-empty ``root`` without ``DONE`` is never touched.
    """
    config = config or DemoConfig()
    config.validate()
    root = Path(root).absolute()
    digest = config.config_hash()
    done = _read_done(root)
    if done is not None and done.get("config_hash") == digest:
        return root
    if root.exists() and (not root.is_dir() or (done is None and any(root.iterdir()))):
        raise ConfigError(
            f"{root} exists and is not a demo dataset (no DONE marker), so it was left untouched. "
            "Give generate_demo_dataset an empty or new directory, or delete this one yourself."
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-pid{os.getpid()}-", dir=root.parent))
    try:
        np_rng = np.random.default_rng(config.seed)
        py_rng = random.Random(config.seed)
        _write_flickr(tmp, config, np_rng, py_rng)
        _write_imagenet(tmp, config, np_rng)
        marker = {"generator_version": GENERATOR_VERSION, "config_hash": digest, "config": config.recorded()}
        (tmp / "DONE").write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        old = None
        if root.exists():
            current = _read_done(root)
            if current is not None and current.get("config_hash") == digest:
                shutil.rmtree(tmp)  # a concurrent run finished the same dataset first
                return root
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-pid{os.getpid()}-", dir=root.parent))
            os.replace(root, old / "dataset")
        os.replace(tmp, root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
