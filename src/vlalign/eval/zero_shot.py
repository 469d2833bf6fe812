"""Zero-shot classification: CLIP prompt-ensemble classifier and CLIP_benchmark metrics.

Metric names follow CLIP_benchmark: ``acc1``, ``acc5`` (top-k accuracy, fractions in [0, 1]) and
``mean_per_class_recall`` (balanced accuracy: top-1 recall averaged over the classes that occur in
``labels``, like sklearn's ``balanced_accuracy_score``).

Two deliberate differences from CLIP_benchmark, both identical to it on untied logits with C >= k:

- Ties are broken pessimistically, as in :mod:`vlalign.eval.retrieval`: a sample is correct at k
  only if fewer than k *other* classes have a logit >= the true class's. A constant classifier thus
  scores 0, not whatever ``topk`` happens to return.
- With fewer classes than k, k is clamped to C (acc@k is then 1.0); CLIP_benchmark reports NaN
  for ``acc5`` when C < 5.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vlalign.eval.retrieval import _validate_ks


def zero_shot_classifier(class_text_embs: torch.Tensor) -> torch.Tensor:
    """Prompt-ensembled class embeddings: mean over templates, re-normalised (CLIP).

    Args:
        class_text_embs: (C, T, D) text embeddings of class c under template t. Each embedding is
            L2-normalised first (a no-op when the encoder already normalised), as CLIP does.

    Returns:
        (C, D) unit-norm class embeddings; logits are ``scale * image_emb @ classifier.T``.
    """
    if not isinstance(class_text_embs, torch.Tensor) or class_text_embs.ndim != 3:
        shape = tuple(class_text_embs.shape) if isinstance(class_text_embs, torch.Tensor) else type(class_text_embs).__name__
        raise ValueError(f"class_text_embs must have shape (C classes, T templates, D), got {shape}.")
    if 0 in class_text_embs.shape:
        raise ValueError(f"class_text_embs has an empty dimension: shape {tuple(class_text_embs.shape)}.")
    per_template = F.normalize(class_text_embs, dim=-1)  # (C, T, D)
    ensembled = per_template.mean(dim=1)  # (C, D)
    return F.normalize(ensembled, dim=-1)  # (C, D)


def true_class_ranks(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) pessimistic rank of the true class: the number of other classes with logit >= it."""
    logits, labels = _validate(logits, labels)
    true_logit = logits.gather(1, labels[:, None])  # (N, 1)
    return (logits >= true_logit).sum(dim=1) - 1  # (N,) the true class counts itself once


def per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(C,) top-1 accuracy (recall) of each class; NaN for a class with no sample in ``labels``."""
    correct = (true_class_ranks(logits, labels) == 0).double()  # (N,)
    n_classes = logits.shape[1]
    labels = labels.long().to(correct.device)
    hits = torch.zeros(n_classes, dtype=torch.float64, device=correct.device).index_add_(0, labels, correct)  # (C,)
    counts = torch.bincount(labels, minlength=n_classes).double()  # (C,)
    return torch.where(counts > 0, hits / counts.clamp(min=1), torch.full_like(hits, float("nan")))


def zero_shot_metrics(
    logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-k accuracies and mean per-class recall, named as CLIP_benchmark (``acc1``, ``acc5``, ...).

    Args:
        logits: (N, C) class scores (any monotone scale: cosine, scaled logits or probabilities).
        labels: (N,) integer true class of each sample, in [0, C).
        ks: top-k values; each k gives key ``f"acc{k}"``. k > C is clamped to C (accuracy 1.0).

    Returns:
        ``{"acc1": ..., "acc5": ..., "mean_per_class_recall": ...}`` as fractions in [0, 1], with
        pessimistic tie-breaking (see the module docstring). ``mean_per_class_recall`` averages
        over the classes present in ``labels`` only.
    """
    ks = _validate_ks(ks)
    ranks = true_class_ranks(logits, labels)  # (N,)
    n_classes = logits.shape[1]
    metrics = {f"acc{k}": int((ranks < min(k, n_classes)).sum()) / ranks.numel() for k in ks}
    recall = per_class_accuracy(logits, labels)  # (C,)
    metrics["mean_per_class_recall"] = float(recall[~recall.isnan()].mean())
    return metrics


def zero_shot_chance(labels: torch.Tensor, n_classes: int, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Expected :func:`zero_shot_metrics` under a uniformly random ranking of the C classes.

    acc@k = min(k, C) / C and mean_per_class_recall = 1 / C, whatever the label distribution;
    ``labels`` is only checked to lie in [0, n_classes), so a mismatched class count is caught.
    """
    ks = _validate_ks(ks)
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 1:
        raise ValueError(f"n_classes must be a positive int, got {n_classes!r}.")
    _validate_labels(labels, n_classes)
    chance = {f"acc{k}": min(k, n_classes) / n_classes for k in ks}
    chance["mean_per_class_recall"] = 1.0 / n_classes
    return chance


def _validate(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes and values; return the logits and the labels as long on the logits' device."""
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or 0 in logits.shape:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must have shape (N samples, C classes) with N, C >= 1, got {shape}.")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}.")
    if not torch.isfinite(logits).all():
        row = int(torch.nonzero(~torch.isfinite(logits).all(dim=1))[0])
        raise ValueError(f"logits row {row} holds NaN or inf; check the encoder outputs.")
    labels = _validate_labels(labels, logits.shape[1])
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries but logits has {logits.shape[0]} rows.")
    return logits, labels.to(logits.device)


def _validate_labels(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Check that ``labels`` is a 1-D integer tensor with values in [0, n_classes); return it as long."""
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.numel() == 0:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must have shape (N,) with N >= 1, got {shape}.")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor of class indices, got {labels.dtype}.")
    bad = (labels < 0) | (labels >= n_classes)
    if bad.any():
        row = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"labels[{row}] = {int(labels[row])} is outside [0, {n_classes}); the labels must index "
            f"the {n_classes} classes (wnids.txt line order)."
        )
    return labels.long()
