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

Controlled conditions, each a :class:`DemoConfig` option that is off by default (the default dataset is the same,
byte for byte, as before they existed), with what they did recorded in ``flickr_demo/ground_truth.json``:

- fine detail, ``patterns`` (above): ``fine_detail.pattern_of_image``, the pattern of every image by imgid;
- noisy pairs, ``noise_fraction``: that fraction of the training captions of each language replaced by a caption of
  another training image of another colour or shape (wrong for its image, as web alt-text often is); val and test
  are untouched. ``noise.captions`` lists every training caption: ``caption_id`` (as the manifest names it with no
  ``id_prefix``), ``imgid``, ``noisy``, ``describes_imgid`` (the image it really describes) and ``source_sentid``;
- near-duplicate captions, ``near_duplicates``: that fraction of each split's images drawn in groups of
  ``near_duplicate_group_size`` large shapes that differ only in colour or only in shape, captioned with the same
  templates and wording, so their captions differ by that one word (one or two Chinese characters, e.g. 红色圆形 /
  蓝色圆形): close in text space, far in image space (DAA's "semantic collapse"). ``near_duplicates.groups`` lists
  each group's split, varied attribute and imgids.

Layout (see docs/INTERFACES.md section 2)::

    root/flickr_demo/images/000123.png
    root/flickr_demo/dataset_demo.json      Karpathy format, English
    root/flickr_demo/dataset_demo_zh.json   Karpathy format, Chinese, same imgid/filename
    root/flickr_demo/ground_truth.json      only with a controlled condition on (above)
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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vlalign.errors import ConfigError, dataclass_from_mapping

#: Bump when the generator's output changes, so existing datasets are regenerated.
GENERATOR_VERSION = 1
#: Written beside the Karpathy files when a controlled condition is on (DemoConfig: noise_fraction,
#: near_duplicates, patterns): what each condition did, per caption or image (see :func:`generate_demo_dataset`).
GROUND_TRUTH_FILE = "ground_truth.json"

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
    # Controlled conditions (README "The default dataset"); each is off by default and recorded in ground_truth.json.
    patterns: bool = False  # fine detail: shapes filled striped/checked (1-px), named in the captions; image_size 128
    noise_fraction: float = 0.0  # noisy pairs: this fraction of TRAINING captions (per language) replaced by a
    #                               caption of another training image of another colour or shape; val/test untouched
    near_duplicates: float = 0.0  # fraction of each split's images drawn in near-duplicate groups: images differing
    #                               in colour or shape only, whose captions differ by that one word (zh: 1-2 characters)
    near_duplicate_group_size: int = 4  # images per near-duplicate group, 2-7 (colour has 7 values, shape 5)

    @classmethod
    def from_mapping(cls, overrides: dict | None, where: str = "DemoConfig") -> "DemoConfig":
        """A validated config from ``overrides`` (e.g. ``vlalign demo --config`` JSON), unknown keys named."""
        if overrides is not None and not isinstance(overrides, Mapping):
            raise ConfigError(f"{where}: expected a mapping of DemoConfig fields, got {overrides!r}.")
        config = dataclass_from_mapping(cls, dict(overrides or {}), where, "DemoConfig field(s)")
        config.validate()
        return config

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first field out of range."""
        for name in ("noise_fraction", "near_duplicates", "near_miss_fraction", "noise_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"DemoConfig.{name}={value!r}: expected a number.")
        for name in ("image_size", "n_train", "n_val", "n_test", "captions_en", "captions_zh", "zero_shot_per_class",
                     "seed", "near_duplicate_group_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"DemoConfig.{name}={value!r}: expected an integer.")
        if not isinstance(self.patterns, bool):
            raise ConfigError(f"DemoConfig.patterns={self.patterns!r}: expected true or false.")
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
            ("noise_fraction", 0.0 <= self.noise_fraction <= 1.0, "a fraction of the training captions, in [0, 1]"),
            ("near_duplicates", 0.0 <= self.near_duplicates <= 1.0, "a fraction of each split's images, in [0, 1]"),
            ("near_duplicate_group_size", 2 <= self.near_duplicate_group_size <= max(map(len, _GROUP_VALUES.values())),
             f"between 2 and {max(map(len, _GROUP_VALUES.values()))} (images per group; colour has that many values)"),
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
_LATER_FIELDS = {"patterns": False, "noise_fraction": 0.0, "near_duplicates": 0.0, "near_duplicate_group_size": 4}

#: Attributes a near-duplicate group varies (one per group), with their values: each is clearly visible in the image
#: (a large shape) and one word in the English captions, one or two characters in the Chinese ones.
_GROUP_VALUES: dict[str, tuple[str, ...]] = {"colour": tuple(COLOURS), "shape": SHAPES}


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


def _english_plan(n: int, rng: random.Random) -> list[tuple[str, dict[str, int], bool]]:
    """The wording of ``n`` English captions, apart from the attributes: ``(template, choices, capitalised)`` each,
    from ``n`` different templates. :func:`_render_english` writes them for any attributes, so images of a
    near-duplicate group share one plan."""
    plan = []
    for template in rng.sample(_EN_TEMPLATES, n):
        choices = _random_choices(rng)
        plan.append((template, choices, rng.random() < 0.5))  # draws in the order english_captions always had
    return plan


def _render_english(attributes: dict, plan: list[tuple[str, dict[str, int], bool]]) -> list[str]:
    captions = []
    for template, choices, capitalised in plan:
        text = template.format(**_en_slots(attributes, choices))
        captions.append(text[0].upper() + text[1:] + "." if capitalised else text)  # as human captions vary
    return captions


def english_captions(attributes: dict, n: int, rng: random.Random) -> list[str]:
    """Return ``n`` English captions of ``attributes``, each from a different template."""
    return _render_english(attributes, _english_plan(n, rng))


#: Number of surface forms of each Chinese size and position word (every one has two).
_ZH_VARIANTS = 2


def _chinese_plan(n: int, rng: random.Random) -> list[tuple[str, int, int, bool]]:
    """The wording of ``n`` Chinese captions: ``(template, position form, size form, full stop)`` each."""
    plan = []
    for template in rng.sample(_ZH_TEMPLATES, n):
        pos, size = rng.randrange(_ZH_VARIANTS), rng.randrange(_ZH_VARIANTS)
        plan.append((template, pos, size, rng.random() < 0.5))
    return plan


def _render_chinese(attributes: dict, plan: list[tuple[str, int, int, bool]]) -> list[str]:
    captions = []
    for template, pos, size, full_stop in plan:
        text = template.format(
            pos=_ZH_POSITION[attributes["position"]][pos],
            count=_ZH_COUNT[int(attributes["count"])],
            size=_ZH_SIZE[attributes["size"]][size],
            colour=_ZH_COLOUR[attributes["colour"]],
            shape=_ZH_SHAPE[attributes["shape"]],
        )
        captions.append(text + ("。" if full_stop else ""))
    return captions


def chinese_captions(attributes: dict, n: int, rng: random.Random) -> list[str]:
    """Return ``n`` Chinese captions of ``attributes``, each from a different template."""
    return _render_chinese(attributes, _chinese_plan(n, rng))


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


def _layout(config: DemoConfig, np_rng: np.random.Generator) -> list[tuple[str, int | None]]:
    """``(split, near-duplicate group or None)`` per image, in imgid order. Each split has
    ``round(near_duplicates * n / group_size)`` groups of consecutive images, placed among its single images at
    random; without near-duplicates no random number is drawn, so the default dataset is unchanged."""
    layout: list[tuple[str, int | None]] = []
    n_groups = 0
    for split, n in (("train", config.n_train), ("val", config.n_val), ("test", config.n_test)):
        size = config.near_duplicate_group_size
        groups = min(int(round(config.near_duplicates * n / size)), n // size) if config.near_duplicates else 0
        units = [size] * groups + [1] * (n - groups * size)
        if groups:
            units = [units[k] for k in np_rng.permutation(len(units))]
        for unit in units:
            group = None
            if unit > 1:
                group, n_groups = n_groups, n_groups + 1
            layout += [(split, group)] * unit
    return layout


def _group_members(config: DemoConfig, np_rng: np.random.Generator) -> tuple[str, list[dict]]:
    """The varied attribute and the attributes of each image of a new near-duplicate group: one large shape set
    (so the difference is clearly visible), the varied attribute taking a different value in every image."""
    varied = str(np_rng.choice([a for a, v in _GROUP_VALUES.items() if len(v) >= config.near_duplicate_group_size]))
    base = {**_random_attributes(np_rng, config.patterns), "size": "large"}
    values = np_rng.choice(_GROUP_VALUES[varied], size=config.near_duplicate_group_size, replace=False)
    return varied, [{**base, varied: str(value)} for value in values]


def _write_flickr(out: Path, config: DemoConfig, np_rng: np.random.Generator, py_rng: random.Random) -> None:
    images_dir = out / "flickr_demo" / "images"
    images_dir.mkdir(parents=True)
    layout = _layout(config, np_rng)
    n_images = len(layout)
    entries_en, entries_zh = [], []
    groups: list[dict] = []  # near-duplicate groups, for the ground truth
    members: list[dict] = []  # attributes of the current group's images not drawn yet
    plans = None  # the current group's caption wording, shared by its images
    previous: dict | None = None
    for imgid, (split, group) in enumerate(layout):
        near_miss = None
        if group is not None:
            if len(groups) == group:  # the group's first image
                varied, members = _group_members(config, np_rng)
                plans = (_english_plan(config.captions_en, py_rng), _chinese_plan(config.captions_zh, py_rng))
                if varied == "colour":  # "one orange circle", not "an orange circle": the colour is the only change
                    plans[0][:] = [(t, {**choices, "article": 1}, cap) for t, choices, cap in plans[0]]
                groups.append({"group": group, "split": split, "varied": varied, "imgids": []})
            attributes = members.pop(0)
            groups[group]["imgids"].append(imgid)
            captions_en, captions_zh = _render_english(attributes, plans[0]), _render_chinese(attributes, plans[1])
        else:
            if previous is not None and previous["split"] == split and np_rng.random() < config.near_miss_fraction:
                changed = str(np_rng.choice(ATTRIBUTES + ((PATTERN_ATTRIBUTE,) if config.patterns else ())))
                attributes = dict(previous["attributes"])
                attributes[changed] = py_rng.choice([v for v in _attribute_values(changed) if v != attributes[changed]])
                near_miss = {"of": previous["imgid"], "changed": changed}
            else:
                attributes = _random_attributes(np_rng, config.patterns)
            captions_en = captions_zh = None
        filename = f"{imgid:06d}.png"
        draw_image(attributes, config.image_size, config.noise_std, np_rng).save(images_dir / filename)
        if captions_en is None:  # drawn after the image, in this order, as the generator always did
            captions_en = english_captions(attributes, config.captions_en, py_rng)
            captions_zh = chinese_captions(attributes, config.captions_zh, py_rng)
        for entries, captions, tokens, first_sentid in (
            (entries_en, captions_en, _en_tokens, imgid * config.captions_en),
            (entries_zh, captions_zh, _zh_tokens, n_images * config.captions_en + imgid * config.captions_zh),
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
    truth = {}
    if config.patterns:
        truth["fine_detail"] = {
            "attribute": PATTERN_ATTRIBUTE, "values": list(PATTERNS), "image_size": config.image_size,
            "pattern_of_image": [entry["attributes"][PATTERN_ATTRIBUTE] for entry in entries_en],
        }
    if config.near_duplicates:
        truth["near_duplicates"] = {"fraction": config.near_duplicates, "group_size": config.near_duplicate_group_size,
                                    "groups": groups}
    if config.noise_fraction:
        truth["noise"] = _add_noise(config, {"en": entries_en, "zh": entries_zh})
    for name, entries in (("dataset_demo.json", entries_en), ("dataset_demo_zh.json", entries_zh)):
        payload = {"images": entries, "dataset": "flickr_demo"}
        (out / "flickr_demo" / name).write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")
    if truth:  # only with a condition on: the default dataset has no such file
        truth = {"generator_version": GENERATOR_VERSION, "config": config.recorded(), **truth}
        (out / "flickr_demo" / GROUND_TRUTH_FILE).write_text(json.dumps(truth, ensure_ascii=False), encoding="utf-8")


def _add_noise(config: DemoConfig, entries: dict[str, list[dict]]) -> dict:
    """Replace ``round(noise_fraction * n)`` of the ``n`` training captions of each language, chosen at random, by a
    caption (same language) of another training image of another colour or shape, so the caption is wrong for its
    image (every template names colour and shape), as in web alt-text. Uses its own random stream, so every image and
    every other caption is the same as without noise. Returns the ground truth, one record per training caption."""
    rng = np.random.default_rng((config.seed, 1))  # stream 1: noise (the seed alone draws the data)
    train = [k for k, entry in enumerate(entries["en"]) if entry["split"] == "train"]
    classes = np.array([_class_index(entries["en"][k]["attributes"]) for k in train])  # (n_train,) colour x shape
    records = []
    for lang, lang_entries in entries.items():
        original = {k: [s["raw"] for s in lang_entries[k]["sentences"]] for k in train}
        slots = [(t, j) for t, k in enumerate(train) for j in range(len(original[k]))]  # every training caption
        chosen = sorted(rng.choice(len(slots), size=int(round(config.noise_fraction * len(slots))), replace=False))
        source: dict[tuple[int, int], tuple[int, int]] = {}  # (train position, caption) -> (donor imgid, caption)
        for t, j in (slots[i] for i in chosen):
            others = np.flatnonzero(classes != classes[t])  # training images of another colour or shape
            if others.size == 0:
                raise ConfigError(f"DemoConfig.noise_fraction={config.noise_fraction!r}: every training image shows "
                                  "the same colour and shape, so no other image's caption is wrong for it; raise "
                                  "n_train.")
            donor = train[int(others[rng.integers(others.size)])]
            source[(t, j)] = donor, int(rng.integers(len(original[donor])))
            sentence = lang_entries[train[t]]["sentences"][j]
            sentence["raw"] = original[donor][source[(t, j)][1]]
            sentence["tokens"] = (_en_tokens if lang == "en" else _zh_tokens)(sentence["raw"])
        for t, j in slots:
            sentence = lang_entries[train[t]]["sentences"][j]
            donor, donor_caption = source.get((t, j), (train[t], j))
            records.append({
                "caption_id": f"{lang}:{sentence['sentid']}", "lang": lang, "sentid": sentence["sentid"],
                "imgid": train[t], "noisy": (t, j) in source, "describes_imgid": donor,
                "source_sentid": lang_entries[donor]["sentids"][donor_caption],
            })
    counts = {lang: {"captions": sum(r["lang"] == lang for r in records),
                     "noisy": sum(r["lang"] == lang and r["noisy"] for r in records)} for lang in entries}
    return {"fraction": config.noise_fraction, "counts": counts, "captions": records}


def _class_index(attributes: dict) -> int:
    """The zero-shot class (colour x shape) of ``attributes``, as its index in :func:`class_names`."""
    return list(COLOURS).index(attributes["colour"]) * len(SHAPES) + SHAPES.index(attributes["shape"])


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


def has_conditions(config: DemoConfig) -> bool:
    """Whether ``config`` turns on a controlled condition, so that the dataset has a ground-truth file."""
    return bool(config.patterns or config.noise_fraction or config.near_duplicates)


def _complete(root: Path, config: DemoConfig) -> bool:
    """A dataset of ``config``'s hash is complete when it has its ground truth (a fine-detail dataset made before the
    ground truth existed has the same hash but not the file, and is made again)."""
    return not has_conditions(config) or (root / "flickr_demo" / GROUND_TRUTH_FILE).is_file()


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
    if done is not None and done.get("config_hash") == digest and _complete(root, config):
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
            if current is not None and current.get("config_hash") == digest and _complete(root, config):
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
