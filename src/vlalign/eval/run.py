"""Evaluate a model on a manifest split (retrieval) and on a class-folder set (zero-shot).

These functions embed with the model, then call the pure metric functions of ``vlalign.eval``.
Each returns ``{"metrics": {...}, "chance": {...}, ...}`` with CLIP_benchmark metric names.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from vlalign.errors import ConfigError, DatasetFormatError
from vlalign.eval.calibration import expected_calibration_error
from vlalign.eval.retrieval import recall_curve_from_ranks, recall_from_ranks, retrieval_chance, retrieval_ranks
from vlalign.eval.zero_shot import per_class_accuracy, zero_shot_chance, zero_shot_classifier, zero_shot_metrics
from vlalign.models import CLIPModel, ModelConfig, build_tokenizer_for
from vlalign.models.inference import embed_images, embed_texts


def retrieval_inputs(
    manifest: pd.DataFrame, split: str, lang: str
) -> tuple[list[str], list[str], list[str], torch.Tensor]:
    """Unique image paths and their allowed roots, captions, and each caption's image index for one split and
    language."""
    rows = manifest[(manifest["split"] == split) & (manifest["lang"] == lang)]
    if rows.empty:
        raise DatasetFormatError(
            f"the manifest has no rows with split={split!r} and lang={lang!r}; "
            f"it has splits {sorted(manifest['split'].unique())} and languages {sorted(manifest['lang'].unique())}."
        )
    image_ids = list(dict.fromkeys(rows["image_id"]))  # first-seen order, unique
    index = {image_id: i for i, image_id in enumerate(image_ids)}
    firsts = rows.drop_duplicates("image_id").set_index("image_id").loc[image_ids]
    text_to_image = torch.tensor([index[i] for i in rows["image_id"]], dtype=torch.long)  # (M,)
    return firsts["image_path"].tolist(), firsts["image_root"].tolist(), rows["caption"].tolist(), text_to_image


def evaluate_retrieval(
    model: CLIPModel,
    cfg: ModelConfig,
    manifest: pd.DataFrame,
    split: str = "test",
    lang: str = "en",
    batch_size: int = 256,
    chunk_size: int = 1024,
    max_k: int = 50,
) -> dict[str, Any]:
    """Text->image and image->text recall@1/5/10 with the multi-caption protocol, beside chance.

    Also returns the recall@K curve for K = 1..max_k (and its chance curve) for the report's plot.
    """
    paths, roots, captions, text_to_image = retrieval_inputs(manifest, split, lang)
    tokenizer = build_tokenizer_for(cfg)
    image_emb = embed_images(model, cfg, paths, roots, batch_size=batch_size)  # (N, D)
    text_emb = embed_texts(model, cfg, tokenizer, captions, batch_size=batch_size)  # (M, D)
    ranks = retrieval_ranks(image_emb, text_emb, text_to_image, chunk_size=chunk_size)
    max_k = min(max_k, len(paths))
    curve_chance = retrieval_chance(text_to_image, len(paths), ks=tuple(range(1, max_k + 1)))
    chance = retrieval_chance(text_to_image, len(paths))
    return {
        "split": split,
        "language": lang,
        "n_images": len(paths),
        "n_captions": len(captions),
        "metrics": recall_from_ranks(ranks),
        "chance": chance,
        "curve": recall_curve_from_ranks(ranks, max_k),
        "curve_chance": {
            "image_retrieval_recall": [curve_chance[f"image_retrieval_recall@{k}"] for k in range(1, max_k + 1)],
            "text_retrieval_recall": [curve_chance[f"text_retrieval_recall@{k}"] for k in range(1, max_k + 1)],
        },
    }


def evaluate_zero_shot(
    model: CLIPModel,
    cfg: ModelConfig,
    images: pd.DataFrame,
    classnames: list[str],
    templates: list[str],
    lang: str = "en",
    batch_size: int = 256,
    probabilities: str = "auto",
) -> dict[str, Any]:
    """Zero-shot top-1/top-5 and mean per-class recall with prompt-template ensembling, beside chance.

    Class probabilities come from the loss the model was trained with (``probabilities``):

    * ``softmax``: ``softmax_c(logit_scale * cos_c)``, CLIP's InfoNCE: the classes compete for one unit of mass;
    * ``sigmoid``: ``sigmoid(logit_scale * cos_c + logit_bias)``, SigLIP's pairwise loss: for each class, the
      probability that the image matches its (ensembled) prompt, independent of the other classes;
    * ``auto``: ``sigmoid`` for a model with a learnable logit bias (SigLIP), else ``softmax``.

    Their expected calibration error (top-1 confidence against top-1 accuracy) and reliability-diagram data are
    returned too. The accuracies use the raw cosines, so they do not depend on this choice.
    """
    kind = zero_shot_probability_kind(model, probabilities)
    if images.empty:
        raise DatasetFormatError("the zero-shot set has no images.")
    tokenizer = build_tokenizer_for(cfg)
    prompts = [template.replace("{}", name) for name in classnames for template in templates]
    prompt_emb = embed_texts(model, cfg, tokenizer, prompts, batch_size=batch_size)  # (C*T, D)
    classifier = zero_shot_classifier(prompt_emb.view(len(classnames), len(templates), -1))  # (C, D)
    image_emb = embed_images(model, cfg, images["image_path"].tolist(), images["image_root"].tolist(),
                             batch_size=batch_size)  # (N, D)
    logits = image_emb @ classifier.T  # (N, C) cosine similarities
    labels = torch.tensor(images["label"].to_numpy(), dtype=torch.long)  # (N,)
    with torch.no_grad():
        if kind == "sigmoid":
            probs = torch.sigmoid(model.scale() * logits + model.logit_bias)  # (N, C) independent per class
        else:
            probs = (model.scale() * logits).softmax(dim=1)  # (N, C)
    accuracy = per_class_accuracy(logits, labels)  # (C,), NaN where a class has no image
    per_class = {classnames[c]: float(accuracy[c]) for c in range(len(classnames)) if not torch.isnan(accuracy[c])}
    return {
        "language": lang,
        "n_images": len(images),
        "n_classes": len(classnames),
        "n_templates": len(templates),
        "metrics": zero_shot_metrics(logits, labels),
        "chance": zero_shot_chance(labels, len(classnames)),
        "per_class_accuracy": per_class,
        "probabilities": kind,
        "reliability": expected_calibration_error(probs, labels, normalized=kind == "softmax"),
    }


PROBABILITY_KINDS = ("auto", "softmax", "sigmoid")


def zero_shot_probability_kind(model: Any, probabilities: str = "auto") -> str:
    """``softmax`` or ``sigmoid``: what ``probabilities`` asks for, ``auto`` choosing by the model having a logit bias
    (a SigLIP-trained model). ``sigmoid`` for a model without a bias is a ConfigError."""
    if probabilities not in PROBABILITY_KINDS:
        raise ConfigError(f"zero-shot probabilities={probabilities!r}: expected one of {list(PROBABILITY_KINDS)}.")
    has_bias = getattr(model, "logit_bias", None) is not None
    if probabilities == "auto":
        return "sigmoid" if has_bias else "softmax"
    if probabilities == "sigmoid" and not has_bias:
        raise ConfigError("zero-shot probabilities=sigmoid needs a model with a learnable logit bias (SigLIP: "
                          "init_logit_bias); this model has none. Use softmax or auto.")
    return probabilities
