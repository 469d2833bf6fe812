"""SigLIP's pairwise sigmoid loss (Zhai et al., 2023) with a learnable temperature and bias.

Every (image, text) pair of the (global) batch is an independent binary problem: is this the matching pair?
With s = exp(t') the model's logit scale (t' initialised to log 10) and b its learnable logit bias (initialised
to -10; ``ModelConfig.init_logit_bias``)::

    L = -(1/N) * sum_i sum_j log sigmoid( z_ij * (s * v_i . t_j + b) ),   z_ij = +1 if j = i else -1

Under torch.distributed each rank gathers the texts of every rank (with gradient) and scores its own n images
against all N texts, normalised per local row (1/n); DDP's gradient averaging over the N/n ranks then gives the
gradient of the global loss over all N x N pairs. The maths lives in :mod:`vlalign.losses` (naive, tiled, Triton):
``loss_impl: auto`` computes it in tiles of ``tile`` x ``tile`` logits once the global batch exceeds
``tiled_threshold`` (and with the fused kernels on CUDA), so no N x N matrix is ever held for a large N.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vlalign.errors import ConfigError
from vlalign.objectives.clip import ContrastiveObjective
from vlalign.objectives.registry import register_objective

LOSS_IMPLS = ("auto", "naive", "tiled", "triton")


def check_loss_impl(objective: str, loss_impl: str, tile: int, tiled_threshold: int) -> None:
    """Raise :class:`ConfigError` naming the objective when the implementation options are invalid."""
    if loss_impl not in LOSS_IMPLS:
        raise ConfigError(f"objective {objective}: loss_impl={loss_impl!r}; expected auto, naive, tiled or triton.")
    if tile < 1 or tiled_threshold < 1:
        raise ConfigError(f"objective {objective}: tile and tiled_threshold must be positive integers "
                          f"(got tile={tile}, tiled_threshold={tiled_threshold}).")


@dataclass
class SiglipOptions:
    """Options of the ``siglip`` objective."""

    gather_with_grad: bool = True  # gather the texts across ranks with gradients (False: a wrong gradient, the
    #                                cross-rank terms' gradient to this rank's texts is dropped)
    loss_impl: str = "auto"  # naive | tiled | triton | auto (tiled above tiled_threshold on CPU, triton on CUDA)
    tile: int = 1024  # rows / columns of logits per tile in the tiled and Triton implementations
    tiled_threshold: int = 8192  # auto computes in tiles from this many gathered texts on

    def __post_init__(self) -> None:
        check_loss_impl("siglip", self.loss_impl, self.tile, self.tiled_threshold)


def logit_bias_of(out: dict[str, torch.Tensor], objective: str) -> torch.Tensor:
    """The model's learnable logit bias from its output dict, or a ConfigError saying how to give the model one."""
    bias = out.get("logit_bias")
    if bias is None:
        raise ConfigError(
            f"objective {objective} needs a model with a learnable logit bias, and this model has none: set "
            "init_logit_bias: -10.0 (and init_temperature: 0.1, i.e. t' = log 10) in the model overrides, as the "
            "`siglip` recipe does (training.recipes.siglip.model.overrides)."
        )
    return bias


@register_objective("siglip", options=SiglipOptions)
class SiglipObjective(ContrastiveObjective):
    """Pairwise sigmoid loss over the local images against the gathered texts."""

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        from vlalign.losses.select import contrastive_loss

        bias = logit_bias_of(out, "siglip")  # ()
        image, _, scale, _, text_all, offset = self.features(out, gather_images=False)  # (n, D), (), (N, D), int
        loss = contrastive_loss(
            "siglip", self.options.loss_impl, image_rows=image, text_cols=text_all, logit_scale=scale,
            logit_bias=bias, row_offset=offset, tile=self.options.tile, tiled_threshold=self.options.tiled_threshold,
        )
        return {"loss": loss, "sigmoid": loss.detach()}
