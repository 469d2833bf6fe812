"""Synthetic captions: a second training set over the same images (SPHINX trains on real captions, continues on
synthetic ones, then merges the two models).

A *captioner* turns training rows (the manifest of INTERFACES §1) into rows with synthetic captions: the same
images, ids and split, new captions, ``caption_id`` prefixed ``syn:`` and ``source`` ``synthetic:<captioner>:...``.
Captioners are registered by name (:func:`register_captioner`), so a model captioner plugs in without touching the
pipeline: the BLIP captioner (``blip``, :func:`vlalign.data.capfilt.blip_captioner`) reads its model from
``CaptionerContext.checkpoint`` (the recipe's ``synthetic.checkpoint`` names a checkpoint file, e.g. a ``blip`` run's
``stage2/final.pt``, or ``synthetic.checkpoint_stage`` a stage of the same recipe whose final checkpoint the pipeline
hands in).

The built-in captioner, ``template``, needs no model: it writes templated captions from each image's ground-truth
attributes (only the built-in dataset stores them, ``vlalign.data.demo``), in one fixed terse style unlike the
human-like templates, and makes a captioner's mistakes on purpose: with probability ``error_rate`` a caption gets one
attribute wrong. ``include_real`` keeps the real captions beside the synthetic ones (a mixture: the training decoder
draws one of an image's captions uniformly).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

import numpy as np
import pandas as pd

from vlalign.errors import ConfigError, DatasetFormatError, dataclass_from_mapping


@dataclass
class SyntheticConfig:
    """The ``synthetic`` section of a recipe: which captioner writes the second training set, and how."""

    captioner: str = "template"  # registered captioner (list_captioners()); issue 11's BLIP captioner plugs in here
    options: dict[str, Any] = field(default_factory=dict)  # the captioner's own options
    include_real: bool = False  # keep each image's real captions beside the synthetic ones (a caption mixture)
    checkpoint_stage: str | None = None  # model captioners: the recipe stage whose final checkpoint captions
    checkpoint: str | None = None  # model captioners: or a checkpoint file (e.g. a blip run's stage2/final.pt)
    seed: int = 0  # seeds the captioner's random choices

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str = "synthetic") -> SyntheticConfig:
        """Build from a recipe section, naming unknown fields."""
        return dataclass_from_mapping(cls, data, where)


@dataclass
class CaptionerContext:
    """What a captioner may use besides the rows."""

    attributes: dict[str, dict[str, Any]] = field(default_factory=dict)  # image file name -> ground-truth attributes
    checkpoint: dict[str, Any] | None = None  # a model checkpoint (model captioners; None for ``template``)
    seed: int = 0  # seed of the captioner's random choices


#: ``captioner(rows, options, context) -> rows``: one output row per synthetic caption (manifest columns).
Captioner = Callable[[pd.DataFrame, dict[str, Any], CaptionerContext], pd.DataFrame]

_CAPTIONERS: dict[str, Captioner] = {}


def register_captioner(name: str) -> Callable[[Captioner], Captioner]:
    """Decorator registering a captioner under ``name`` (the value of the recipe's ``synthetic.captioner``)."""

    def decorate(fn: Captioner) -> Captioner:
        if name in _CAPTIONERS and _CAPTIONERS[name] is not fn:
            raise ConfigError(f"captioner {name!r} is registered twice.")
        _CAPTIONERS[name] = fn
        return fn

    return decorate


def _load_builtin() -> None:
    import vlalign.data.capfilt  # noqa: F401  (registers "blip", the BLIP captioner)


def list_captioners() -> list[str]:
    """Names of the registered captioners."""
    _load_builtin()
    return sorted(_CAPTIONERS)


def attributes_by_file(karpathy: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Image file name -> ``attributes`` from a Karpathy JSON that stores them (the built-in dataset's)."""
    return {PurePath(str(e.get("filename", ""))).name: e["attributes"]
            for e in (karpathy or {}).get("images", []) if e.get("attributes")}


@register_captioner("template")
def template_captioner(rows: pd.DataFrame, options: dict[str, Any], context: CaptionerContext) -> pd.DataFrame:
    """Templated captions from ground-truth attributes. Options: ``captions_per_image`` (default 2),
    ``error_rate`` (default 0.15: the probability that a caption names one attribute wrongly)."""
    from vlalign.data.demo import corrupt_attribute, templated_caption

    allowed = {"captions_per_image", "error_rate"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(f"synthetic.options: unknown option(s) {unknown} of the template captioner; allowed are "
                          f"{sorted(allowed)}.")
    per_image = int(options.get("captions_per_image", 2))
    error_rate = float(options.get("error_rate", 0.15))
    if per_image < 1 or not 0.0 <= error_rate <= 1.0:
        raise ConfigError(f"synthetic.options: captions_per_image={per_image} must be >= 1 and error_rate={error_rate} "
                          "in [0, 1].")
    out = []
    firsts = rows.drop_duplicates(["image_id", "lang"])
    for row in firsts.itertuples(index=False):
        name = PurePath(str(row.image_path)).name
        attributes = context.attributes.get(name)
        if attributes is None:
            raise DatasetFormatError(
                f"template captioner: no ground-truth attributes for image {row.image_id!r} ({name}, {row.source}); "
                "only the built-in dataset stores them. For another corpus use a model captioner "
                "(synthetic.captioner, e.g. the BLIP captioner, registered with vlalign.data.synthetic.register_captioner)."
            )
        rng = random.Random(int(np.random.SeedSequence([context.seed, _stable(row.image_id), _stable(row.lang)])
                                .generate_state(1)[0]))
        for k in range(per_image):
            said = corrupt_attribute(attributes, rng) if rng.random() < error_rate else attributes
            out.append({**row._asdict(), "caption": templated_caption(said, row.lang, rng),
                        "caption_id": f"syn:{row.lang}:{row.image_id}:{k}", "source": f"synthetic:template:{row.source}"})
    return pd.DataFrame(out, columns=list(rows.columns))


def _stable(text: Any) -> int:
    """A process-independent integer of ``text`` (Python's hash() is salted per process)."""
    return int.from_bytes(str(text).encode("utf-8")[:16].ljust(16, b"\0"), "little") % (2**63)


def synthetic_captions(rows: pd.DataFrame, config: SyntheticConfig, context: CaptionerContext) -> pd.DataFrame:
    """The training rows with synthetic captions (and the real ones too with ``include_real``), same columns."""
    _load_builtin()
    if config.captioner not in _CAPTIONERS:
        raise ConfigError(f"synthetic.captioner={config.captioner!r} is not registered; the captioners are "
                          f"{list_captioners()} (register one with vlalign.data.synthetic.register_captioner).")
    if rows.empty:
        raise DatasetFormatError("synthetic captions: no training rows to caption.")
    context = CaptionerContext(context.attributes, context.checkpoint, config.seed)
    synthetic = _CAPTIONERS[config.captioner](rows, dict(config.options), context)
    missing = [c for c in rows.columns if c not in synthetic.columns]
    if missing or synthetic.empty:
        raise DatasetFormatError(f"captioner {config.captioner!r} returned {len(synthetic)} rows lacking columns "
                                 f"{missing}; it must return manifest rows with every input column.")
    combined = pd.concat([rows, synthetic[rows.columns]]) if config.include_real else synthetic[rows.columns]
    return combined.sort_values(["image_id", "lang", "caption_id"], kind="stable").reset_index(drop=True)
