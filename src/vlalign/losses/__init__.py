"""Training losses: pure maths over features.

* :mod:`~vlalign.losses.contrastive`: ``clip_loss`` / ``ClipLoss`` over the model's output dict (used by the loop).
* :mod:`~vlalign.losses.functional`: naive local-form CLIP, SigLIP and DAA-weighted losses (the fp64 reference).
* :mod:`~vlalign.losses.tiled`: the same losses tiled in plain torch (custom autograd Functions, any batch size).
* :mod:`~vlalign.losses.triton`: the same as Triton kernels (CUDA; the interpreter on CPU for tests).
* :mod:`~vlalign.losses.select`: ``loss_impl: auto | naive | tiled | triton`` and ``contrastive_loss`` dispatch.
* :mod:`~vlalign.losses.bench`: ``vlalign loss-bench`` (time and peak memory of one fwd+bwd).
"""

from vlalign.losses.contrastive import ClipLoss, clip_loss, info_nce
from vlalign.losses.functional import clip_loss_local, daa_weights, siglip_loss_local, weighted_clip_loss_local
from vlalign.losses.select import LOSS_IMPLS, LOSS_KINDS, contrastive_loss, resolve_impl
from vlalign.losses.tiled import tiled_clip_loss_local, tiled_siglip_loss_local, tiled_weighted_clip_loss_local
from vlalign.losses.triton import (
    triton_clip_loss_local,
    triton_siglip_loss_local,
    triton_weighted_clip_loss_local,
)

__all__ = [
    "LOSS_IMPLS",
    "LOSS_KINDS",
    "ClipLoss",
    "clip_loss",
    "clip_loss_local",
    "contrastive_loss",
    "daa_weights",
    "info_nce",
    "resolve_impl",
    "siglip_loss_local",
    "tiled_clip_loss_local",
    "tiled_siglip_loss_local",
    "tiled_weighted_clip_loss_local",
    "triton_clip_loss_local",
    "triton_siglip_loss_local",
    "triton_weighted_clip_loss_local",
    "weighted_clip_loss_local",
]
