"""Compositional probe: does the model prefer an image's true caption over one with a single attribute swapped?

For each test image the probe holds a pair of English captions that share the template and every
wording choice and differ in exactly one attribute (colour, shape or position), as made by
:func:`vlalign.data.demo.swap_attribute_caption`. The model is right on a pair when

    cos(image, true caption) > cos(image, swapped caption)

strictly (a tie counts against the model, as in :mod:`vlalign.eval.retrieval`). Chance is 0.5.
This is CLIP_benchmark's ``image_caption_selection`` task (SugarCrepe-style swap-att / swap-obj)
on the built-in dataset.

The pairs need each image's ground-truth attributes, which only the built-in default dataset stores
(the ``attributes`` of each Karpathy JSON entry). :func:`compositional_pairs` returns no pairs for a
corpus without them (real datasets), and the probe is then skipped.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

import torch
import torch.nn.functional as F

#: Attributes swapped by default: one per caption pair.
PROBE_ATTRIBUTES = ("colour", "shape", "position")

#: Probability of a correct choice under a random ranking of the two captions.
PROBE_CHANCE = 0.5

#: One probe item: ``(image_path, true_caption, swapped_caption, attribute, image_root)``.
ProbePair = tuple[str, str, str, str, str]


def compositional_pairs(
    karpathy: Mapping[str, Any],
    image_paths: Mapping[str, tuple[str, str]],
    split: str = "test",
    attributes: Sequence[str] = PROBE_ATTRIBUTES,
    seed: int = 0,
) -> list[ProbePair]:
    """Probe pairs for every image of ``split`` that has ``attributes`` in the Karpathy JSON.

    Args:
        karpathy: the parsed Karpathy JSON (``{"images": [{"filename", "split", "attributes", ...}]}``).
        image_paths: file name -> (image path, its ``image_root`` value) of the validated images; images not in it
            are skipped (e.g. quarantined ones).
        split: the Karpathy split to probe.
        attributes: attributes to swap; image number i swaps ``attributes[i % len(attributes)]``, so
            each attribute gets about a third of the images.
        seed: seed of the swapped value and of the wording choices (deterministic pairs).

    Returns:
        ``[(image_path, true_caption, swapped_caption, attribute, image_root), ...]``; empty when no entry of
        ``split`` carries ``attributes`` (a real corpus): the probe does not apply.
    """
    from vlalign.data.demo import swap_attribute_caption  # caption grammar of the built-in dataset

    if not attributes:
        raise ValueError("attributes must name at least one attribute to swap.")
    rng = random.Random(seed)
    pairs: list[ProbePair] = []
    entries = [e for e in karpathy.get("images", []) if e.get("split") == split and e.get("attributes")]
    for entry in entries:
        found = image_paths.get(PurePath(str(entry.get("filename", ""))).name)
        if found is None:
            continue
        which = attributes[len(pairs) % len(attributes)]
        true_caption, swapped_caption = swap_attribute_caption(entry["attributes"], which, rng)
        pairs.append((str(found[0]), true_caption, swapped_caption, which, str(found[1])))
    return pairs


def compositional_accuracy(
    image_emb: torch.Tensor, true_emb: torch.Tensor, swapped_emb: torch.Tensor, attributes: Sequence[str]
) -> dict[str, float]:
    """Fraction of pairs where the image is closer (cosine) to its true caption than to the swapped one.

    Args:
        image_emb: (P, D) image embeddings (normalised here).
        true_emb: (P, D) embeddings of the true captions.
        swapped_emb: (P, D) embeddings of the captions with one attribute swapped.
        attributes: (P,) the swapped attribute of each pair.

    Returns:
        ``{"compositional_accuracy": ..., "compositional_accuracy/<attribute>": ...}`` (fractions in
        [0, 1]; per attribute in order of first appearance). Ties count as wrong.
    """
    if image_emb.ndim != 2 or image_emb.shape != true_emb.shape or image_emb.shape != swapped_emb.shape:
        raise ValueError(
            f"embeddings must all have shape (P pairs, D); got image {tuple(image_emb.shape)}, "
            f"true {tuple(true_emb.shape)}, swapped {tuple(swapped_emb.shape)}."
        )
    if image_emb.shape[0] == 0 or len(attributes) != image_emb.shape[0]:
        raise ValueError(f"need P >= 1 pairs and one attribute per pair; got {image_emb.shape[0]} pairs, "
                         f"{len(attributes)} attributes.")
    image_emb = F.normalize(image_emb.double(), dim=-1)  # (P, D)
    sim_true = (image_emb * F.normalize(true_emb.double(), dim=-1)).sum(dim=-1)  # (P,)
    sim_swapped = (image_emb * F.normalize(swapped_emb.double(), dim=-1)).sum(dim=-1)  # (P,)
    correct = (sim_true > sim_swapped).double()  # (P,)
    metrics = {"compositional_accuracy": float(correct.mean())}
    for which in dict.fromkeys(attributes):
        mask = torch.tensor([a == which for a in attributes])  # (P,)
        metrics[f"compositional_accuracy/{which}"] = float(correct[mask].mean())
    return metrics


def compositional_probe(model: Any, cfg: Any, pairs: Sequence[ProbePair], batch_size: int = 256) -> dict[str, Any]:
    """Embed the probe pairs with ``model`` and score them; ``{}`` when there are no pairs.

    Returns ``{"n_pairs", "n_pairs_per_attribute", "metrics": {...}, "chance": {...}}`` with the
    metrics of :func:`compositional_accuracy` and chance 0.5 for each.
    """
    from vlalign.models import build_tokenizer_for
    from vlalign.models.inference import embed_images, embed_texts

    if not pairs:
        return {}
    paths, true_captions, swapped_captions, attributes, roots = (list(column) for column in zip(*pairs))
    tokenizer = build_tokenizer_for(cfg)
    image_emb = embed_images(model, cfg, paths, roots, batch_size=batch_size)  # (P, D)
    true_emb = embed_texts(model, cfg, tokenizer, true_captions, batch_size=batch_size)  # (P, D)
    swapped_emb = embed_texts(model, cfg, tokenizer, swapped_captions, batch_size=batch_size)  # (P, D)
    metrics = compositional_accuracy(image_emb, true_emb, swapped_emb, attributes)
    return {
        "n_pairs": len(pairs),
        "n_pairs_per_attribute": {a: attributes.count(a) for a in dict.fromkeys(attributes)},
        "metrics": metrics,
        "chance": {name: PROBE_CHANCE for name in metrics},
    }
