"""Choosing a loss implementation: ``loss_impl: auto | naive | tiled | triton`` per objective.

* ``naive``: :mod:`vlalign.losses.functional`, the full (n, N) logit matrix; fastest while it fits.
* ``tiled``: :mod:`vlalign.losses.tiled`, plain torch, O(N * D + tile^2) memory, any device.
* ``triton``: :mod:`vlalign.losses.triton`, the same tiling as fused GPU kernels (CUDA, or the interpreter).
* ``auto``: ``triton`` on CUDA (``tiled`` if triton is missing), otherwise ``tiled`` when the global batch N
  exceeds ``tiled_threshold`` and ``naive`` below it.
"""

from __future__ import annotations

from typing import Callable

import torch

from vlalign.errors import ConfigError, LossInputError
from vlalign.losses import functional, tiled
from vlalign.losses.triton import ops as triton_ops

__all__ = ["LOSS_IMPLS", "LOSS_KINDS", "contrastive_loss", "loss_function", "resolve_impl"]

LOSS_IMPLS = ("auto", "naive", "tiled", "triton")
LOSS_KINDS = ("clip", "siglip", "weighted_clip")

_FUNCTIONS: dict[str, dict[str, Callable[..., torch.Tensor]]] = {
    "clip": {
        "naive": functional.clip_loss_local,
        "tiled": tiled.tiled_clip_loss_local,
        "triton": triton_ops.triton_clip_loss_local,
    },
    "siglip": {
        "naive": functional.siglip_loss_local,
        "tiled": tiled.tiled_siglip_loss_local,
        "triton": triton_ops.triton_siglip_loss_local,
    },
    "weighted_clip": {
        "naive": functional.weighted_clip_loss_local,
        "tiled": tiled.tiled_weighted_clip_loss_local,
        "triton": triton_ops.triton_weighted_clip_loss_local,
    },
}

# Keyword arguments of each kind (beyond ``row_offset``, which every kind accepts).
_REQUIRED = {
    "clip": ("image_rows", "text_rows", "image_cols", "text_cols", "logit_scale"),
    "siglip": ("image_rows", "text_cols", "logit_scale", "logit_bias"),
    "weighted_clip": ("image_rows", "text_rows", "image_cols", "text_cols", "logit_scale", "weights_rows"),
}


def resolve_impl(impl: str, n: int, device: torch.device | str, tiled_threshold: int = 8192) -> str:
    """The concrete implementation (``naive``, ``tiled`` or ``triton``) for ``impl`` at global batch ``n``.

    ``auto`` gives ``triton`` on CUDA (``tiled`` when triton is not installed), else ``tiled`` if
    ``n > tiled_threshold``, else ``naive``. An explicit ``triton`` that cannot run raises :class:`ConfigError`.
    """
    if impl not in LOSS_IMPLS:
        raise ConfigError(f"loss_impl: {impl!r} is not one of {', '.join(LOSS_IMPLS)}; fix the objective's loss_impl.")
    device = torch.device(device)
    if impl == "auto":
        if device.type == "cuda":
            return "triton" if triton_ops.triton_unavailable_reason(device) is None else "tiled"
        return "tiled" if n > tiled_threshold else "naive"
    if impl == "triton":
        reason = triton_ops.triton_unavailable_reason(device)
        if reason is not None:
            raise ConfigError(f"loss_impl: triton cannot run here: {reason}. Use loss_impl: tiled or auto.")
    return impl


def loss_function(kind: str, impl: str) -> Callable[..., torch.Tensor]:
    """The function computing loss ``kind`` with the concrete ``impl`` (``naive``, ``tiled`` or ``triton``)."""
    if kind not in _FUNCTIONS:
        raise ConfigError(f"loss kind: {kind!r} is not one of {', '.join(LOSS_KINDS)}.")
    if impl not in _FUNCTIONS[kind]:
        raise ConfigError(f"loss_impl: {impl!r} is not a concrete implementation (naive, tiled, triton).")
    return _FUNCTIONS[kind][impl]


def contrastive_loss(
    kind: str, impl: str, *, tile: int = 1024, tiled_threshold: int = 8192, **kwargs: torch.Tensor | int
) -> torch.Tensor:
    """Compute loss ``kind`` (``clip``, ``siglip``, ``weighted_clip``) with ``impl`` (``auto`` resolved here).

    ``kwargs`` are the keyword arguments of the chosen function in :mod:`vlalign.losses.functional`
    (e.g. ``image_rows=..., text_cols=..., logit_scale=..., row_offset=...``); ``tile`` goes to the tiled and
    Triton paths only. The global batch N used by ``auto`` is the number of rows of ``text_cols``.
    """
    if kind not in _REQUIRED:
        raise ConfigError(f"loss kind: {kind!r} is not one of {', '.join(LOSS_KINDS)}.")
    missing = [name for name in _REQUIRED[kind] if name not in kwargs]
    unknown = sorted(set(kwargs) - set(_REQUIRED[kind]) - {"row_offset"})
    if missing or unknown:
        raise LossInputError(
            f"contrastive_loss({kind!r}): missing arguments {missing}, unexpected arguments {unknown}; "
            f"expected {list(_REQUIRED[kind])} and optionally row_offset."
        )
    cols = kwargs["text_cols"]
    assert isinstance(cols, torch.Tensor)
    resolved = resolve_impl(impl, cols.shape[0], cols.device, tiled_threshold)
    fn = loss_function(kind, resolved)
    if resolved == "naive":
        return fn(**kwargs)
    return fn(**kwargs, tile=tile)
