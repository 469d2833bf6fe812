"""InfoNCE with a learnable temperature (CLIP), the first registered objective.

L = (L_i->t + L_t->i) / 2 with L_i->t = -(1/N) sum_i log softmax_j(s * v_i . t_j)[i], s = exp(logit_scale)
clamped at the model's maximum. Under torch.distributed the features of every rank are gathered *with*
gradients and each rank scores its own rows against all columns (``local_loss``), or the whole N x N matrix. Only
with the gradient through the gather is each rank's gradient the true one (``gather_with_grad: false`` gives exactly
1/world_size of it with the whole matrix, and a wrong one with ``local_loss``: measured, DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vlalign.errors import ConfigError
from vlalign.objectives.base import Objective, ObjectiveContext
from vlalign.objectives.registry import register_objective


@dataclass
class ClipOptions:
    """Options of the ``clip`` objective."""

    local_loss: bool = True  # with several ranks: each scores its own rows against all columns ((N/w) x N logits)
    # gather features across ranks with gradients. False is never the true gradient: with local_loss: false it is
    # 1/world_size of it (0.5x measured on 2 ranks); with local_loss: true it is wrong (the gradient the other
    # ranks' rows send to this rank's features is dropped)
    gather_with_grad: bool = True
    loss_impl: str = "auto"  # naive | tiled | triton | auto (tiled above tiled_threshold on CPU, triton on CUDA)
    tile: int = 1024  # tile size of the tiled / Triton implementations
    tiled_threshold: int = 8192  # auto picks the tiled loss on CPU from this many columns on

    def __post_init__(self) -> None:
        if self.loss_impl not in ("auto", "naive", "tiled", "triton"):
            raise ConfigError(f"objective clip: loss_impl={self.loss_impl!r}; expected auto, naive, tiled or triton.")
        if self.tile < 1 or self.tiled_threshold < 1:
            raise ConfigError("objective clip: tile and tiled_threshold must be positive integers.")


def gather_features(x: torch.Tensor, context: ObjectiveContext, with_grad: bool) -> tuple[torch.Tensor, int]:
    """All ranks' ``x`` (n, D) concatenated (N, D), and this rank's row offset in it."""
    if not context.dist.distributed:
        return x, 0
    from vlalign.distributed.gather import gather_no_grad, gather_with_grad

    offset = context.dist.rank * x.shape[0]
    if with_grad:
        return gather_with_grad(x), offset
    # (N, D) without gradient; this rank's live rows are put back, so its own rows keep their gradient, but the
    # gradient the other ranks' rows send to this rank's features is lost: not the true gradient (DESIGN.md)
    gathered = gather_no_grad(x)
    return torch.cat([gathered[:offset], x, gathered[offset + x.shape[0]:]]), offset


class ContrastiveObjective(Objective):
    """Base of the contrastive objectives (clip, siglip, daa): options kept, features gathered across ranks."""

    coupled_keys = ("image_features", "text_features")

    def __init__(self, options: Any, context: ObjectiveContext) -> None:
        super().__init__(context)
        self.options = options

    def features(self, out: dict[str, torch.Tensor], gather_images: bool = True) -> tuple[torch.Tensor, ...]:
        """``(image (n, D), text (n, D), scale (), image_all (N, D) or None, text_all (N, D), row offset)``: this
        rank's normalised features and the global batch's, gathered with or without gradient per the options."""
        image, text, scale = out["image_features"], out["text_features"], out["logit_scale"]
        with_grad = self.options.gather_with_grad
        text_all, offset = gather_features(text, self.context, with_grad)
        image_all = gather_features(image, self.context, with_grad)[0] if gather_images else None
        return image, text, scale, image_all, text_all, offset


@register_objective("clip", options=ClipOptions)
class ClipObjective(ContrastiveObjective):
    """Symmetric InfoNCE over the (gathered) batch."""

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        from vlalign.losses.select import contrastive_loss

        image, text, scale, image_all, text_all, offset = self.features(out)  # (n, D) x2, (), (N, D) x2, int
        if self.options.local_loss or not self.context.dist.distributed:
            rows = (image, text, offset)
        else:  # every rank computes the whole N x N loss (DDP averages the identical results)
            rows = (image_all, text_all, 0)
        loss = contrastive_loss(
            "clip", self.options.loss_impl, image_rows=rows[0], text_rows=rows[1], image_cols=image_all,
            text_cols=text_all, logit_scale=scale, row_offset=rows[2], tile=self.options.tile,
            tiled_threshold=self.options.tiled_threshold,
        )
        return {"loss": loss, "contrastive": loss.detach()}
