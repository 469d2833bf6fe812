"""Training losses over the model's output dict."""

from vlalign.losses.contrastive import ClipLoss, clip_loss, info_nce

__all__ = ["ClipLoss", "clip_loss", "info_nce"]
