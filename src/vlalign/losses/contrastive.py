"""Symmetric InfoNCE (CLIP) loss over a batch of matching image-text pairs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlalign.losses.functional import clip_loss_local


def info_nce(logits: torch.Tensor) -> torch.Tensor:
    """One-directional InfoNCE: row i's positive is column i. ``logits`` (N, N) -> () mean cross-entropy.

    With ``logits = scale * v @ t.T`` this is L_i->t = -(1/N) sum_i log softmax_j(logits[i, j])[i].
    """
    targets = torch.arange(logits.shape[0], device=logits.device)  # (N,)
    return F.cross_entropy(logits, targets)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE L = (L_i->t + L_t->i) / 2 over normalised (N, D) features; ``logit_scale`` = 1/tau, ().

    The single-process global form of :func:`vlalign.losses.functional.clip_loss_local` (rows are the columns).
    """
    return clip_loss_local(image_features, text_features, image_features, text_features, logit_scale)  # ()


class ClipLoss(nn.Module):
    """Loss module over the model's output dict (``image_features``, ``text_features``, ``logit_scale``)."""

    def forward(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"contrastive": L, "loss": total}``; the total is the contrastive loss alone."""
        contrastive = clip_loss(outputs["image_features"], outputs["text_features"], outputs["logit_scale"])
        return {"contrastive": contrastive, "loss": contrastive}
