"""Dynamic-anchor alignment (DAA): a weighted symmetric InfoNCE against "semantic collapse".

Proposed for Chinese vision-language models, whose image embeddings tend to crowd around the average caption
("semantic collapse"): the samples far from that centre are the ones the model still confuses, so they get more
weight. For a (global) batch of N pairs with unit image features v_i and text features t_i, logit scale s::

    a   = (1/N) * sum_j t_j                                   # the anchor: the batch's mean text feature
    w_i = softmax_i( (1 - cos(v_i, a)) / T_w )                # per-image weights, sum_i w_i = 1
    CE_i^{i->t} = -log softmax_j(s * v_i . t_j)[i]
    CE_i^{t->i} = -log softmax_j(s * t_i . v_j)[i]
    L   = sum_i w_i * (CE_i^{i->t} + CE_i^{t->i}) / 2          # the weighted symmetric InfoNCE

Images far from the anchor (low cosine) weigh more; T_w (``temperature``, 0.05 as the source suggests) sets how
sharply. T_w only means something against the spread of the cosines in a batch: 0.05 suits features crowded
around the anchor (cosines within a few hundredths, as with frozen towers), but once the towers train the cosines
spread over ~1 and T_w = 0.05 puts nearly all the weight on one image (the objective logs the effective batch
1/sum w^2 as ``daa_effective_batch``). The shipped recipe therefore uses T_w = 1.0 (README, "The daa recipe").
``uniform_mix`` u mixes in uniform weights, w_i <- u/N + (1-u) w_i (u = 1 is InfoNCE). The weights carry no gradient (:func:`vlalign.losses.functional.daa_weights` explains why). With uniform
weights w_i = 1/N (T_w -> infinity) L is exactly CLIP's InfoNCE.

Under torch.distributed the features of every rank are gathered first, so the anchor and the weights are those of
the global batch; each rank then scores its own rows and scales its weighted sum by N/n, so that DDP's averaging
gives the gradient of the global L.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vlalign.errors import ConfigError
from vlalign.objectives.clip import ContrastiveObjective
from vlalign.objectives.registry import register_objective
from vlalign.objectives.siglip import check_loss_impl


@dataclass
class DaaOptions:
    """Options of the ``daa`` objective."""

    temperature: float = 0.05  # T_w of the weights softmax((1 - cos(v_i, anchor)) / T_w); larger = more uniform
    uniform_mix: float = 0.0  # u: weights u/N + (1-u) * softmax(...); 0 is the source's formula, 1 is InfoNCE
    gather_with_grad: bool = True  # gather features across ranks with gradients (False gives a wrong gradient)
    loss_impl: str = "auto"  # naive | tiled | triton | auto (tiled above tiled_threshold on CPU, triton on CUDA)
    tile: int = 1024  # rows / columns of logits per tile in the tiled and Triton implementations
    tiled_threshold: int = 8192  # auto computes in tiles from this many gathered samples on

    def __post_init__(self) -> None:
        if not float(self.temperature) > 0:
            raise ConfigError(f"objective daa: temperature={self.temperature!r}; expected T_w > 0 (e.g. 0.05).")
        if not 0.0 <= float(self.uniform_mix) <= 1.0:
            raise ConfigError(f"objective daa: uniform_mix={self.uniform_mix!r}; expected a fraction in [0, 1].")
        check_loss_impl("daa", self.loss_impl, self.tile, self.tiled_threshold)


@register_objective("daa", options=DaaOptions)
class DaaObjective(ContrastiveObjective):
    """Weighted symmetric InfoNCE with weights from the distance of each image to the batch's mean text."""

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        from vlalign.losses.functional import daa_weights
        from vlalign.losses.select import contrastive_loss

        image, text, scale, image_all, text_all, offset = self.features(out)  # (n, D) x2, (), (N, D) x2, int
        weights = daa_weights(  # (N,) global
            image_all.detach(), text_all.detach(), self.options.temperature, self.options.uniform_mix
        )
        rows = weights[offset:offset + image.shape[0]]  # (n,) this rank's slice
        loss = contrastive_loss(
            "weighted_clip", self.options.loss_impl, image_rows=image, text_rows=text, image_cols=image_all,
            text_cols=text_all, logit_scale=scale, weights_rows=rows, row_offset=offset, tile=self.options.tile,
            tiled_threshold=self.options.tiled_threshold,
        )
        return {
            "loss": loss,
            "weighted_infonce": loss.detach(),
            "daa_effective_batch": (1.0 / (weights.double() ** 2).sum()).float(),  # () 1/sum w^2: N when uniform
            "daa_max_weight": (weights.max() * weights.shape[0]).float(),  # () N * max w: 1 when uniform
        }
