"""Naive contrastive losses in "local form": the fp64 ground truth and the path for small batches.

Every function here builds the full (n, N) logit matrix and lets torch autograd differentiate it. They are
the reference that the tiled (:mod:`vlalign.losses.tiled`) and Triton (:mod:`vlalign.losses.triton`)
implementations are tested against, and the fastest choice while n x N logits fit in memory.

**Local form.** A process holds ``rows``, its own n samples, and ``cols``, the global batch of N samples
gathered from every rank (:func:`vlalign.distributed.gather.gather_with_grad`), which contains its own rows at
``row_offset``. The positive of local row i is column ``row_offset + i``. In a single process rows *is* cols
and ``row_offset`` is 0. Each loss is normalised per local row (``1/n``), so that averaging the gradients over
ranks (what DDP does) gives the gradient of the global loss.

All features are L2-normalised by the model. ``logit_scale`` is the already-exponentiated inverse temperature
(a 0-d tensor), ``logit_bias`` (SigLIP) a 0-d tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vlalign.errors import LossInputError

__all__ = [
    "SIGLIP_INIT_LOGIT_BIAS",
    "SIGLIP_INIT_LOG_SCALE",
    "check_local_inputs",
    "clip_loss_local",
    "daa_weights",
    "siglip_loss_local",
    "weighted_clip_loss_local",
]


SIGLIP_INIT_LOG_SCALE = math.log(10.0)  # SigLIP paper: t' = log 10, logit_scale = exp(t') = 10
SIGLIP_INIT_LOGIT_BIAS = -10.0  # SigLIP paper: b = -10, so that the many negatives start with a small loss


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, {t.dtype}, {t.device}"


def check_local_inputs(
    rows: dict[str, torch.Tensor],
    cols: dict[str, torch.Tensor],
    scalars: dict[str, torch.Tensor],
    row_offset: int,
    weights_rows: torch.Tensor | None = None,
) -> tuple[int, int]:
    """Check the tensors of a local-form loss; return ``(n, N)``. Raises :class:`LossInputError` naming the argument.

    ``rows``/``cols`` map argument names to (n, D) / (N, D) feature tensors, ``scalars`` names to 0-d tensors.
    """
    named = {**rows, **cols}
    first_name, first = next(iter(named.items()))
    for name, t in named.items():
        if t.dim() != 2:
            raise LossInputError(f"{name}: expected a 2-d (samples, dim) feature tensor, got {_describe(t)}.")
        if t.shape[1] != first.shape[1] or t.device != first.device:
            raise LossInputError(
                f"{name} ({_describe(t)}) does not match {first_name} ({_describe(first)}): all features must "
                "share their dimension and device."
            )
        if not t.is_floating_point():
            raise LossInputError(f"{name}: expected floating-point features, got {t.dtype}.")
    n = next(iter(rows.values())).shape[0]
    big_n = next(iter(cols.values())).shape[0]
    for name, t in rows.items():
        if t.shape[0] != n:
            raise LossInputError(f"{name}: expected {n} rows like the other row tensors, got {_describe(t)}.")
    for name, t in cols.items():
        if t.shape[0] != big_n:
            raise LossInputError(f"{name}: expected {big_n} rows like the other column tensors, got {_describe(t)}.")
    if n == 0:
        raise LossInputError("the loss got an empty batch (0 local rows); drop empty batches before the loss.")
    if not 0 <= row_offset <= big_n - n:
        raise LossInputError(
            f"row_offset={row_offset}: the {n} local rows must lie inside the {big_n} gathered columns "
            f"(0 <= row_offset <= {big_n - n}); under torch.distributed use rank * local_batch_size."
        )
    for name, t in scalars.items():
        if not isinstance(t, torch.Tensor) or t.numel() != 1:
            raise LossInputError(f"{name}: expected a 0-d tensor, got {t!r}.")
    if weights_rows is not None and tuple(weights_rows.shape) != (n,):
        raise LossInputError(
            f"weights_rows: expected the ({n},) slice of daa_weights for these rows, got shape "
            f"{tuple(weights_rows.shape)}."
        )
    return n, big_n


def _targets(n: int, row_offset: int, device: torch.device) -> torch.Tensor:
    return torch.arange(row_offset, row_offset + n, device=device)  # (n,) column of each row's positive


def _per_row_clip_terms(
    image_rows: torch.Tensor,
    text_rows: torch.Tensor,
    image_cols: torch.Tensor,
    text_cols: torch.Tensor,
    logit_scale: torch.Tensor,
    row_offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) image->text and (n,) text->image cross-entropies of the local rows, from full (n, N) logits."""
    targets = _targets(image_rows.shape[0], row_offset, image_rows.device)  # (n,)
    logits_i2t = logit_scale * image_rows @ text_cols.T  # (n, N) image i against every text
    logits_t2i = logit_scale * text_rows @ image_cols.T  # (n, N) text i against every image
    ce_i2t = F.cross_entropy(logits_i2t, targets, reduction="none")  # (n,)
    ce_t2i = F.cross_entropy(logits_t2i, targets, reduction="none")  # (n,)
    return ce_i2t, ce_t2i


def clip_loss_local(
    image_rows: torch.Tensor,
    text_rows: torch.Tensor,
    image_cols: torch.Tensor,
    text_cols: torch.Tensor,
    logit_scale: torch.Tensor,
    row_offset: int = 0,
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) of the local rows against the gathered columns; returns a 0-d tensor.

    With s = ``logit_scale``, x = image rows, y = text rows, X / Y = image / text columns, o = ``row_offset``::

        L = 1/(2n) * sum_i [ CE(s * x_i @ Y.T, o + i) + CE(s * y_i @ X.T, o + i) ]
        CE(l, k) = logsumexp_j(l_j) - l_k

    ``image_rows``/``text_rows`` (n, D), ``image_cols``/``text_cols`` (N, D), ``logit_scale`` ().
    """
    check_local_inputs(
        {"image_rows": image_rows, "text_rows": text_rows},
        {"image_cols": image_cols, "text_cols": text_cols},
        {"logit_scale": logit_scale},
        row_offset,
    )
    ce_i2t, ce_t2i = _per_row_clip_terms(image_rows, text_rows, image_cols, text_cols, logit_scale, row_offset)
    return 0.5 * (ce_i2t.mean() + ce_t2i.mean())  # ()


def siglip_loss_local(
    image_rows: torch.Tensor,
    text_cols: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    row_offset: int = 0,
) -> torch.Tensor:
    """Pairwise sigmoid loss (SigLIP, Zhai et al. 2023) of the local image rows against every text; 0-d tensor.

    With s = ``logit_scale`` (= exp(t'), t' initialised to log 10), b = ``logit_bias`` (initialised to -10)::

        L = -(1/n) * sum_i sum_j log sigmoid(z_ij * (s * x_i . y_j + b)),   z_ij = +1 if j = o + i else -1

    Every (image, text) pair is an independent binary problem, so there is no softmax over the batch. Over
    ranks, each rank scores its n images against all N texts; averaging the per-rank losses gives the global
    loss (1/N) * sum over all N x N pairs. ``image_rows`` (n, D), ``text_cols`` (N, D), scale and bias ().
    """
    n, _ = check_local_inputs(
        {"image_rows": image_rows},
        {"text_cols": text_cols},
        {"logit_scale": logit_scale, "logit_bias": logit_bias},
        row_offset,
    )
    logits = logit_scale * image_rows @ text_cols.T + logit_bias  # (n, N)
    signs = -torch.ones_like(logits)  # (n, N) z = -1 for every negative pair
    rows = torch.arange(n, device=logits.device)  # (n,)
    signs[rows, rows + row_offset] = 1.0  # z = +1 on the positives
    return -F.logsigmoid(signs * logits).sum() / n  # ()


@torch.no_grad()
def daa_weights(
    image_cols: torch.Tensor, text_cols: torch.Tensor, temperature: float = 0.05, uniform_mix: float = 0.0
) -> torch.Tensor:
    """Dynamic-anchor-alignment weights of the N gathered samples: (N,), non-negative, summing to 1, no gradient.

    The anchor is the mean text feature of the (global) batch; images far from it weigh more::

        a   = (1/N) * sum_j y_j                                  # (D,) anchor
        w_i = softmax_i( (1 - cos(x_i, a)) / T_w )               # (N,)
        w_i <- u / N + (1 - u) * w_i                             # u = ``uniform_mix`` (0: the source's weights)

    With the mix, every sample keeps at least u/N of the weight and the gradient is u times InfoNCE's plus (1 - u)
    times the source's weighted one; the weights still sum to 1, so the loss keeps InfoNCE's scale.

    The weights are computed without gradient: they re-weight the per-sample InfoNCE terms, like importance
    weights, and are not a quantity to optimise. With gradient through w, the loss gradient would gain the
    term sum_i CE_i * grad w_i, which moves weight from hard (high-CE) samples to easy ones, i.e. pulls the
    hard images towards the anchor (the batch's mean text) just to shrink their weight: a drift of the
    features towards the mean that works against alignment, and a strong one, since 1/T_w = 20 by default.
    Detached, the loss is a plain weighted sum whose gradient is sum_i w_i * grad CE_i.

    Pass the *gathered* columns, so that under torch.distributed every rank computes the same global anchor and
    weights; slice ``[row_offset : row_offset + n]`` for the local rows. ``temperature`` is T_w (> 0).
    """
    if not temperature > 0:
        raise LossInputError(f"daa temperature: expected T_w > 0, got {temperature}.")
    if not 0.0 <= uniform_mix <= 1.0:
        raise LossInputError(f"daa uniform_mix: expected a fraction in [0, 1], got {uniform_mix}.")
    check_local_inputs({"image_cols": image_cols}, {"text_cols": text_cols}, {}, 0)
    if image_cols.shape[0] != text_cols.shape[0]:
        raise LossInputError(
            f"daa_weights: image_cols has {image_cols.shape[0]} rows but text_cols {text_cols.shape[0]}; "
            "pass the same gathered batch of pairs."
        )
    acc = torch.float64 if image_cols.dtype == torch.float64 else torch.float32
    anchor = text_cols.to(acc).mean(dim=0, keepdim=True)  # (1, D)
    cos = F.cosine_similarity(image_cols.to(acc), anchor, dim=-1, eps=1e-12)  # (N,)
    weights = torch.softmax((1.0 - cos) / temperature, dim=0)  # (N,)
    if uniform_mix == 0.0:
        return weights  # the source's formula, bit for bit
    return uniform_mix / weights.shape[0] + (1.0 - uniform_mix) * weights  # (N,)


def weighted_clip_loss_local(
    image_rows: torch.Tensor,
    text_rows: torch.Tensor,
    image_cols: torch.Tensor,
    text_cols: torch.Tensor,
    logit_scale: torch.Tensor,
    weights_rows: torch.Tensor,
    row_offset: int = 0,
) -> torch.Tensor:
    """Weighted symmetric InfoNCE (the DAA loss) of the local rows; returns a 0-d tensor.

    With w = ``weights_rows`` (the (n,) slice of :func:`daa_weights` for these rows, detached)::

        L = (N/n) * sum_i w_i * 1/2 * [ CE(s * x_i @ Y.T, o + i) + CE(s * y_i @ X.T, o + i) ]

    With w_i = 1/N everywhere this is :func:`clip_loss_local`. The factor N/n makes DDP's averaging over the
    N/n ranks give the global loss sum_i w_i * CE_i over the whole batch.
    """
    n, big_n = check_local_inputs(
        {"image_rows": image_rows, "text_rows": text_rows},
        {"image_cols": image_cols, "text_cols": text_cols},
        {"logit_scale": logit_scale},
        row_offset,
        weights_rows,
    )
    ce_i2t, ce_t2i = _per_row_clip_terms(image_rows, text_rows, image_cols, text_cols, logit_scale, row_offset)
    weights = weights_rows.detach().to(ce_i2t.dtype)  # (n,)
    return (big_n / n) * (weights * 0.5 * (ce_i2t + ce_t2i)).sum()  # ()
