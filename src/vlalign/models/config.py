"""Model configurations: dataclasses with a comment on every field, and a registry of named YAML configs.

A named config is a YAML file in ``src/vlalign/models/configs/<name>.yaml`` holding the fields of
:class:`ModelConfig`; adding an architecture is adding a file. ``get_model_config(name, **overrides)``
loads one and applies overrides, e.g.::

    get_model_config("tiny-vit-bert", embed_dim=64, image={"timm_kwargs": {"depth": 2}})
    get_model_config("tiny-vit-bert", **{"text.num_layers": 1})   # dotted keys work too
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from vlalign.errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"


#: How a mixed image tower fuses its backbones (``ImageTowerConfig.mix``) and how sub-image views are fused
#: (``ImageTowerConfig.sub_image_fusion``).
MIXES = ("pooled", "tokens")
SUB_IMAGE_FUSIONS = ("concat", "mean")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")


@dataclass
class BackboneConfig:
    """One more timm backbone of a mixed image tower (SPHINX mixes e.g. a ViT and a ConvNet). It sees the same
    pixels as the main backbone (each tile, with sub-images) and is created and loaded like it."""

    name: str = "extra"  # key of its weights: image_tower.backbones.<name>.* (a stage freezes/trains it by that prefix)
    timm_name: str = "convnext_atto"  # timm architecture name; always created with pretrained=False
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments (depths, dims, ...)
    weights: str | None = None  # local state-dict file (path or "pkg:" spec) loaded after creation; None = random init
    weights_match: str = "name"  # file key -> model key mapping: "name" (same names) or "position" (same order)
    mean: list[float] | None = None  # per-channel mean this backbone expects ([0, 1] scale); None = the tower's mean
    std: list[float] | None = None  # per-channel std this backbone expects; None = the tower's std


@dataclass
class ImageTowerConfig:
    """A timm image backbone, created from scratch and optionally loaded from a local weights file; optionally mixed
    with more backbones (``extra_backbones``) and fed high-resolution images as sub-images (``sub_images``)."""

    timm_name: str = "vit_tiny_patch16_224"  # timm architecture name; always created with pretrained=False
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments (img_size, depth, ...)
    weights: str | None = None  # local state-dict file (path or "pkg:" spec) loaded after creation; None = random init
    weights_match: str = "name"  # file key -> model key mapping: "name" (same names) or "position" (same order)
    image_size: int = 64  # side of the square input image in pixels (images are resized to it)
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # per-channel mean on the [0, 1] scale
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # per-channel std on the [0, 1] scale
    max_shift: int = 0  # training augmentation: random translation by up to this many pixels (0 = none)
    extra_backbones: list[BackboneConfig] = field(default_factory=list)  # mixed encoders: more backbones ([] = one)
    mix: str = "pooled"  # mixed tower: "pooled" = concatenate each backbone's pooled vector; "tokens" = concatenate
    #                      the spatial tokens along channels after resampling them to the main backbone's grid, then
    #                      mean-pool. Either way the concatenation is what image_proj projects.
    sub_images: int = 1  # k > 1: the image (image_size = k * the backbones' input size) is split into k x k tiles
    #                      plus one downsampled global view, each encoded on its own (1 = off)
    sub_image_fusion: str = "concat"  # the k*k+1 view vectors: "concat" (then projected by image_proj) or "mean"

    def __post_init__(self) -> None:
        backbones = []
        for index, entry in enumerate(self.extra_backbones or []):
            if isinstance(entry, dict):
                entry = _from_dict(BackboneConfig, entry, f"image.extra_backbones[{index}]")
            if not isinstance(entry, BackboneConfig):
                raise ConfigError(f"image.extra_backbones[{index}]: expected a mapping of BackboneConfig fields "
                                  f"(name, timm_name, timm_kwargs, weights, ...), got {type(entry).__name__}.")
            backbones.append(entry)
        self.extra_backbones = backbones

    @property
    def tile_size(self) -> int:
        """Side of what each backbone sees: the image, or one of its k x k tiles (and the global view)."""
        return self.image_size // max(self.sub_images, 1)

    @property
    def composite(self) -> bool:
        """Whether the tower is more than one plain timm backbone (mixed encoders or sub-images)."""
        return bool(self.extra_backbones) or self.sub_images > 1


@dataclass
class TextTowerConfig:
    """A transformers text encoder: a BERT built from the fields below, or a local pretrained folder."""

    pretrained: str | None = None  # local HF model folder (path or "pkg:" spec); None = BERT from scratch
    vocab: str = "pkg:vlalign/assets/demo_vocab.txt"  # vocab.txt file, or a folder holding tokenizer files
    lowercase: bool = True  # lowercase text before WordPiece (only used with a vocab.txt file)
    context_length: int = 32  # tokens per caption including [CLS] and [SEP]; longer captions are truncated
    pooling: str = "mean"  # sentence vector: "cls" (first token) or "mean" (mean over non-padding tokens)
    hidden_size: int = 128  # scratch BERT: width (ignored with `pretrained`)
    num_layers: int = 2  # scratch BERT: transformer layers (ignored with `pretrained`)
    num_heads: int = 2  # scratch BERT: attention heads (ignored with `pretrained`)
    intermediate_size: int = 512  # scratch BERT: MLP width (ignored with `pretrained`)
    dropout: float = 0.0  # scratch BERT: hidden and attention dropout (ignored with `pretrained`)


@dataclass
class ModelConfig:
    """A vision-language model: an architecture (``arch``) over an image tower and a text tower, projections into a
    shared space and a learnable temperature. ``arch`` picks the builder (vlalign.models.registry); ``dual`` is the
    CLIP-style dual encoder."""

    name: str = "custom"  # registry name, recorded in checkpoints and run parameters
    arch: str = "dual"  # registered architecture (vlalign.models.registry.list_archs()); checkpoints dispatch on it
    arch_options: dict[str, Any] = field(default_factory=dict)  # options of the arch (validated by its dataclass)
    embed_dim: int = 128  # dimension of the shared image-text embedding space
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)  # image tower
    text: TextTowerConfig = field(default_factory=TextTowerConfig)  # text tower
    init_temperature: float = 0.07  # initial softmax temperature tau; logit_scale starts at ln(1 / tau)
    max_logit_scale: float = 100.0  # cap of exp(logit_scale): the parameter is clamped to [0, ln cap] after every step
    init_logit_bias: float | None = None  # a learnable logit bias starting here (SigLIP: -10); None = no bias

    def __post_init__(self) -> None:
        if isinstance(self.image, dict):
            self.image = _from_dict(ImageTowerConfig, self.image, f"{self.name}.image")
        if isinstance(self.text, dict):
            self.text = _from_dict(TextTowerConfig, self.text, f"{self.name}.text")
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        checks = [
            (self.embed_dim > 0, "embed_dim", "a positive integer"),
            (0.0 < self.init_temperature < 1.0, "init_temperature", "a float in (0, 1), e.g. 0.07"),
            (self.max_logit_scale > 1.0 / self.init_temperature, "max_logit_scale", "greater than 1/init_temperature"),
            (self.image.weights_match in ("name", "position"), "image.weights_match", '"name" or "position"'),
            (self.image.image_size > 0, "image.image_size", "a positive integer"),
            (len(self.image.mean) == 3 and len(self.image.std) == 3, "image.mean/std", "three values each"),
            (all(s > 0 for s in self.image.std), "image.std", "positive values"),
            (self.image.max_shift >= 0, "image.max_shift", "an integer >= 0"),
            (self.image.sub_images >= 1, "image.sub_images", "an integer >= 1 (1 = no sub-images)"),
            (
                self.image.image_size % max(self.image.sub_images, 1) == 0,
                "image.image_size",
                f"a multiple of image.sub_images ({self.image.sub_images}): the image is cut into k x k equal tiles",
            ),
            (
                self.image.timm_kwargs.get("img_size", self.image.tile_size) == self.image.tile_size,
                "image.timm_kwargs.img_size",
                f"equal to image.image_size / image.sub_images ({self.image.tile_size})",
            ),
            (self.image.mix in MIXES, "image.mix", f"one of {list(MIXES)}"),
            (self.image.sub_image_fusion in SUB_IMAGE_FUSIONS, "image.sub_image_fusion", f"one of {list(SUB_IMAGE_FUSIONS)}"),
            (self.text.pooling in ("cls", "mean"), "text.pooling", '"cls" or "mean"'),
            (self.text.context_length >= 2, "text.context_length", "an integer >= 2"),
            (0.0 <= self.text.dropout < 1.0, "text.dropout", "a float in [0, 1)"),
        ]
        names = ["main"]
        for index, backbone in enumerate(self.image.extra_backbones):
            where = f"image.extra_backbones[{index}]"
            checks += [
                (bool(_NAME.fullmatch(backbone.name)) and backbone.name not in names, f"{where}.name",
                 f"a unique identifier (letters, digits, '_'; not {names})"),
                (backbone.weights_match in ("name", "position"), f"{where}.weights_match", '"name" or "position"'),
                (backbone.timm_kwargs.get("img_size", self.image.tile_size) == self.image.tile_size,
                 f"{where}.timm_kwargs.img_size", f"equal to image.image_size / image.sub_images ({self.image.tile_size})"),
                (all(v is None or len(v) == 3 for v in (backbone.mean, backbone.std)), f"{where}.mean/std",
                 "null or three values each"),
                (backbone.std is None or all(s > 0 for s in backbone.std), f"{where}.std", "positive values"),
            ]
            names.append(backbone.name)
        for ok, name, expected in checks:
            if not ok:
                raise ConfigError(f"model config {self.name!r}: field {name} must be {expected}; fix the config or override.")
        from vlalign.models.registry import arch_options  # late import: the registry builds models from configs

        arch_options(self.arch, self.arch_options)

    @property
    def init_logit_scale(self) -> float:
        """Initial value of the ``logit_scale`` parameter, ln(1 / init_temperature)."""
        return math.log(1.0 / self.init_temperature)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists, no tuples) that :meth:`from_dict` turns back into an equal config."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build a config from a nested dict, rejecting unknown fields with a :class:`ConfigError`."""
        return _from_dict(cls, data, str(data.get("name", "model config")))


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """Instantiate dataclass ``cls`` from ``data``, naming ``where`` and the field in errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(data).__name__}.")
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown} for {cls.__name__}; allowed fields are {sorted(allowed)}.")
    return cls(**copy.deepcopy(data))


def list_models() -> list[str]:
    """Names of the registered model configs (``configs/*.yaml``), sorted."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def _deep_merge(base: dict[str, Any], overrides: dict[str, Any], where: str) -> dict[str, Any]:
    """Return ``base`` updated with ``overrides``; nested dicts merge key by key, other values replace."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value, f"{where}.{key}")
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _expand_dotted(overrides: dict[str, Any]) -> dict[str, Any]:
    """Turn ``{"image.timm_kwargs.depth": 2}`` into ``{"image": {"timm_kwargs": {"depth": 2}}}``."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _expand_dotted(value) if isinstance(value, dict) else value
    return nested


def get_model_config(name: str, **overrides: Any) -> ModelConfig:
    """Load the registered config ``name`` and apply ``overrides`` (nested dicts or dotted keys)."""
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown model config {name!r}; registered configs are {list_models()} (files in {CONFIG_DIR}).")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc}).") from exc
    data = _deep_merge(data, _expand_dotted(overrides), name)
    data["name"] = data.get("name", name)
    return ModelConfig.from_dict(data)
