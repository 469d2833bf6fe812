"""Tiled contrastive losses in plain torch: never more than one tile of logits, at any batch size.

Same losses and signatures as :mod:`vlalign.losses.functional` plus ``tile``. Each loss is a custom
``torch.autograd.Function`` that

* **forward:** walks the (n, N) logit matrix tile by tile (``tile x tile`` logits at a time) and keeps, per
  row (and per column in the global form), a running log-sum-exp: each tile's log-sum-exp is merged into the
  running one with ``logaddexp``, i.e. the online max-and-rescaled-sum of flash attention written in log space.
  SigLIP needs no normaliser: its per-row sum of ``-log sigmoid`` terms is accumulated the same way.
* **backward:** recomputes each tile from the saved features and log-sum-exps (nothing N x N is stored) and
  accumulates ``dL/d rows``, ``dL/d cols``, ``dL/d logit_scale`` (and ``dL/d logit_bias``) in place.

Memory is O((n + N) * D + tile^2): the inputs, their gradients, a few (N,) vectors and ~4 tiles of logits.
Matmuls and accumulators run in fp32 (fp64 for fp64 inputs) even when the features arrive in bf16/fp16 under
autocast; the loss is an fp32 (or fp64) scalar and gradients come back in each input's dtype.

The per-row cross-entropies are exposed as ``(n,)`` vectors so the plain, weighted and distributed losses are
thin sums on top; the positive logit ``s * x_i . y_{o+i}`` is folded into the Function, so its gradient is
added in place rather than as a second dense (N, D) gradient that autograd would have to sum.

In the *global form* (rows are cols, ``row_offset == 0``: one process, or a gathered global loss) both
directions share one logit matrix S = s * X @ Y.T: image->text needs its row log-sum-exps and text->image its
column log-sum-exps, so one sweep computes both and one backward sweep recomputes each tile once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from vlalign.errors import LossInputError
from vlalign.losses.functional import check_local_inputs

__all__ = [
    "LossOps",
    "TORCH_OPS",
    "acc_dtype",
    "tiled_clip_loss_local",
    "tiled_siglip_loss_local",
    "tiled_weighted_clip_loss_local",
]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the tiled paths: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _spans(n: int, tile: int) -> list[tuple[int, int]]:
    """Consecutive ``[start, stop)`` spans of at most ``tile`` covering ``range(n)``."""
    return [(start, min(start + tile, n)) for start in range(0, n, tile)]


def _diagonal(r0: int, r1: int, c0: int, c1: int, offset: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of tile rows ``[r0, r1)`` whose positive column ``offset + i`` lies in ``[c0, c1)``."""
    lo = max(r0, c0 - offset)
    return lo, max(lo, min(r1, c1 - offset))


def _check_tile(tile: int) -> int:
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise LossInputError(f"tile: expected a positive int (rows/columns of logits per tile), got {tile!r}.")
    return tile


def _no_autocast(device: torch.device) -> torch.autocast:
    """Autocast off inside a Function's forward/backward, so tiles stay in the accumulation dtype."""
    return torch.autocast(device_type=device.type, enabled=False)


def _positive_dots(a: torch.Tensor, b: torch.Tensor, offset: int, tile: int, acc: torch.dtype) -> torch.Tensor:
    """(n,) unscaled positive dots ``a_i . b_{offset+i}``, computed tile by tile (no (n, D) temporary)."""
    out = torch.empty(a.shape[0], dtype=acc, device=a.device)  # (n,)
    for r0, r1 in _spans(a.shape[0], tile):
        a_blk = a[r0:r1].to(acc)  # (t, D)
        b_blk = b[offset + r0 : offset + r1].to(acc)  # (t, D) the positives of these rows
        out[r0:r1] = (a_blk * b_blk).sum(dim=1)  # (t,)
    return out


def _positive_backward(
    a: torch.Tensor,
    b: torch.Tensor,
    g: torch.Tensor,
    offset: int,
    scale: float,
    tile: int,
    grad_a: torch.Tensor,
    grad_b: torch.Tensor,
) -> torch.Tensor:
    """Add the gradient of ``-sum_i g_i * s * a_i . b_{o+i}`` to ``grad_a``/``grad_b`` in place; return d/ds (0-d)."""
    acc = grad_a.dtype
    ds = torch.zeros((), dtype=acc, device=a.device)  # ()
    for r0, r1 in _spans(a.shape[0], tile):
        a_blk = a[r0:r1].to(acc)  # (t, D)
        b_blk = b[offset + r0 : offset + r1].to(acc)  # (t, D)
        g_blk = g[r0:r1, None]  # (t, 1)
        grad_a[r0:r1].sub_(b_blk * g_blk, alpha=scale)
        grad_b[offset + r0 : offset + r1].sub_(a_blk * g_blk, alpha=scale)
        ds -= (g_blk[:, 0] * (a_blk * b_blk).sum(dim=1)).sum()
    return ds


def _finish_rows(a: torch.Tensor, acc_a: torch.Tensor, scale: float, tile: int) -> torch.Tensor:
    """Turn ``acc_a = sum_j G_ij b_j`` into ``dL/da = s * acc_a`` in place; return ``sum_ij G_ij a_i . b_j`` (0-d).

    The logit-scale gradient ``sum_ij G_ij (a_i . b_j)`` equals ``sum_i a_i . acc_a_i``, so it costs one
    O(n * D) pass instead of one product per tile.
    """
    ds = torch.zeros((), dtype=acc_a.dtype, device=a.device)  # ()
    for r0, r1 in _spans(a.shape[0], tile):
        ds += (a[r0:r1].to(acc_a.dtype) * acc_a[r0:r1]).sum()
    acc_a.mul_(scale)
    return ds


class _InfoNCERows(torch.autograd.Function):
    """Per-row cross-entropy ``CE_i = logsumexp_j(s * a_i . b_j) - s * a_i . b_{o+i}``: a (n, D), b (N, D) -> (n,)."""

    @staticmethod
    def forward(ctx, a, b, scale, offset: int, tile: int):  # type: ignore[override]
        acc = acc_dtype(a.dtype)
        s = float(scale)
        with _no_autocast(a.device):
            lse = torch.full((a.shape[0],), -torch.inf, dtype=acc, device=a.device)  # (n,) running row LSE
            for r0, r1 in _spans(a.shape[0], tile):
                a_s = a[r0:r1].to(acc) * s  # (tr, D) rows pre-scaled, so a tile is one matmul
                for c0, c1 in _spans(b.shape[0], tile):
                    logits = torch.mm(a_s, b[c0:c1].to(acc).T)  # (tr, tc)
                    lse[r0:r1] = torch.logaddexp(lse[r0:r1], torch.logsumexp(logits, dim=1))  # (tr,)
            ce = lse - s * _positive_dots(a, b, offset, tile, acc)  # (n,)
        ctx.save_for_backward(a, b, scale, lse)
        ctx.offset, ctx.tile = offset, tile
        return ce

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        a, b, scale, lse = ctx.saved_tensors
        acc, s, tile = lse.dtype, float(scale), ctx.tile
        with _no_autocast(a.device):
            g = g.to(acc).contiguous()  # (n,) dL/dCE_i
            grad_a = torch.zeros(a.shape, dtype=acc, device=a.device)  # (n, D) sum_j G_ij b_j, scaled at the end
            grad_b = torch.zeros(b.shape, dtype=acc, device=b.device)  # (N, D)
            for r0, r1 in _spans(a.shape[0], tile):
                a_s = a[r0:r1].to(acc) * s  # (tr, D)
                for c0, c1 in _spans(b.shape[0], tile):
                    b_blk = b[c0:c1].to(acc)  # (tc, D)
                    grad_logits = torch.mm(a_s, b_blk.T).sub_(lse[r0:r1, None]).exp_().mul_(g[r0:r1, None])  # g_i p_ij
                    grad_a[r0:r1].addmm_(grad_logits, b_blk)  # (tr, D)
                    grad_b[c0:c1].addmm_(grad_logits.T, a_s)  # (tc, D) s * G.T @ a
            ds = _finish_rows(a, grad_a, s, tile)
            ds += _positive_backward(a, b, g, ctx.offset, s, tile, grad_a, grad_b)
        return grad_a.to(a.dtype), grad_b.to(b.dtype), ds.to(scale.dtype).reshape(scale.shape), None, None


class _InfoNCEGlobal(torch.autograd.Function):
    """Both directions of the global form in one sweep: a, b (N, D) -> row CEs (N,), column CEs (N,).

    ``row_ce_i = logsumexp_j S_ij - S_ii`` (image->text), ``col_ce_j = logsumexp_i S_ij - S_jj`` (text->image),
    S = s * a @ b.T never materialised beyond one tile.
    """

    @staticmethod
    def forward(ctx, a, b, scale, tile: int):  # type: ignore[override]
        acc = acc_dtype(a.dtype)
        s = float(scale)
        n = a.shape[0]
        with _no_autocast(a.device):
            row_lse = torch.full((n,), -torch.inf, dtype=acc, device=a.device)  # (N,) running row LSE
            col_lse = torch.full((n,), -torch.inf, dtype=acc, device=a.device)  # (N,) running column LSE
            for r0, r1 in _spans(n, tile):
                a_s = a[r0:r1].to(acc) * s  # (tr, D)
                for c0, c1 in _spans(n, tile):
                    logits = torch.mm(a_s, b[c0:c1].to(acc).T)  # (tr, tc)
                    row_lse[r0:r1] = torch.logaddexp(row_lse[r0:r1], torch.logsumexp(logits, dim=1))  # (tr,)
                    col_lse[c0:c1] = torch.logaddexp(col_lse[c0:c1], torch.logsumexp(logits, dim=0))  # (tc,)
            pos = s * _positive_dots(a, b, 0, tile, acc)  # (N,) diagonal logits
        ctx.save_for_backward(a, b, scale, row_lse, col_lse)
        ctx.tile = tile
        return row_lse - pos, col_lse - pos

    @staticmethod
    def backward(ctx, g_row, g_col):  # type: ignore[override]
        a, b, scale, row_lse, col_lse = ctx.saved_tensors
        acc, s, tile, n = row_lse.dtype, float(scale), ctx.tile, a.shape[0]
        with _no_autocast(a.device):
            g_row = torch.zeros_like(row_lse) if g_row is None else g_row.to(acc).contiguous()  # (N,)
            g_col = torch.zeros_like(col_lse) if g_col is None else g_col.to(acc).contiguous()  # (N,)
            grad_a = torch.zeros(a.shape, dtype=acc, device=a.device)  # (N, D) sum_j G_ij b_j, scaled at the end
            grad_b = torch.zeros(b.shape, dtype=acc, device=b.device)  # (N, D)
            for r0, r1 in _spans(n, tile):
                a_s = a[r0:r1].to(acc) * s  # (tr, D)
                for c0, c1 in _spans(n, tile):
                    b_blk = b[c0:c1].to(acc)  # (tc, D)
                    logits = torch.mm(a_s, b_blk.T)  # (tr, tc)
                    grad_logits = (logits - row_lse[r0:r1, None]).exp_().mul_(g_row[r0:r1, None])  # (tr, tc)
                    grad_logits += logits.sub_(col_lse[None, c0:c1]).exp_().mul_(g_col[None, c0:c1])  # (tr, tc)
                    grad_a[r0:r1].addmm_(grad_logits, b_blk)  # (tr, D)
                    grad_b[c0:c1].addmm_(grad_logits.T, a_s)  # (tc, D)
            ds = _finish_rows(a, grad_a, s, tile)
            ds += _positive_backward(a, b, g_row + g_col, 0, s, tile, grad_a, grad_b)
        return grad_a.to(a.dtype), grad_b.to(b.dtype), ds.to(scale.dtype).reshape(scale.shape), None


class _SigLIPRows(torch.autograd.Function):
    """Per-row SigLIP sums ``sum_j -log sigmoid(z_ij (s a_i . b_j + t))``: a (n, D), b (N, D) -> (n,)."""

    @staticmethod
    def forward(ctx, a, b, scale, bias, offset: int, tile: int):  # type: ignore[override]
        acc = acc_dtype(a.dtype)
        s, t = float(scale), float(bias)
        with _no_autocast(a.device):
            out = torch.zeros(a.shape[0], dtype=acc, device=a.device)  # (n,)
            minus_t = torch.tensor(-t, dtype=acc, device=a.device)  # ()
            for r0, r1 in _spans(a.shape[0], tile):
                a_neg = a[r0:r1].to(acc) * -s  # (tr, D)
                for c0, c1 in _spans(b.shape[0], tile):
                    neg_logits = torch.addmm(minus_t, a_neg, b[c0:c1].to(acc).T)  # (tr, tc) -l = -(s a.b + t)
                    lo, hi = _diagonal(r0, r1, c0, c1, offset)
                    rows = torch.arange(lo - r0, hi - r0, device=a.device)  # (k,) tile rows holding a positive
                    cols = rows + (r0 + offset - c0)  # (k,) their positive's tile column
                    log_sig = F.logsigmoid(neg_logits)  # (tr, tc) log sigmoid(z l) for z = -1
                    log_sig[rows, cols] = F.logsigmoid(-neg_logits[rows, cols])  # (k,) z = +1 on the positives
                    out[r0:r1] -= log_sig.sum(dim=1)  # (tr,)
        ctx.save_for_backward(a, b, scale, bias)
        ctx.offset, ctx.tile = offset, tile
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        a, b, scale, bias = ctx.saved_tensors
        acc, s, t, tile, offset = acc_dtype(a.dtype), float(scale), float(bias), ctx.tile, ctx.offset
        with _no_autocast(a.device):
            g = g.to(acc).contiguous()  # (n,)
            grad_a = torch.zeros(a.shape, dtype=acc, device=a.device)  # (n, D) sum_j G_ij b_j, scaled at the end
            grad_b = torch.zeros(b.shape, dtype=acc, device=b.device)  # (N, D)
            db = torch.zeros((), dtype=acc, device=a.device)  # ()
            bias_t = torch.tensor(t, dtype=acc, device=a.device)  # ()
            for r0, r1 in _spans(a.shape[0], tile):
                a_s = a[r0:r1].to(acc) * s  # (tr, D)
                for c0, c1 in _spans(b.shape[0], tile):
                    b_blk = b[c0:c1].to(acc)  # (tc, D)
                    logits = torch.addmm(bias_t, a_s, b_blk.T)  # (tr, tc)
                    lo, hi = _diagonal(r0, r1, c0, c1, offset)
                    rows = torch.arange(lo - r0, hi - r0, device=a.device)  # (k,)
                    cols = rows + (r0 + offset - c0)  # (k,)
                    pos_grad = -torch.sigmoid(-logits[rows, cols])  # (k,) d/dl of -log sigmoid(l)
                    grad_logits = logits.sigmoid_()  # (tr, tc) d/dl of -log sigmoid(-l) = sigmoid(l)
                    grad_logits[rows, cols] = pos_grad
                    grad_logits.mul_(g[r0:r1, None])  # (tr, tc)
                    grad_a[r0:r1].addmm_(grad_logits, b_blk)  # (tr, D)
                    grad_b[c0:c1].addmm_(grad_logits.T, a_s)  # (tc, D)
                    db += grad_logits.sum()
            ds = _finish_rows(a, grad_a, s, tile)
        return (
            grad_a.to(a.dtype),
            grad_b.to(b.dtype),
            ds.to(scale.dtype).reshape(scale.shape),
            db.to(bias.dtype).reshape(bias.shape),
            None,
            None,
        )


@dataclass(frozen=True)
class LossOps:
    """The three primitives a backend provides; the public losses are sums over their per-row outputs."""

    name: str  # "tiled" or "triton", used in error messages
    infonce_rows: Callable[..., torch.Tensor]  # (a (n,D), b (N,D), scale, offset, tile) -> (n,) CE_i
    infonce_global: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (a, b (N,D), scale, tile) -> (N,), (N,)
    siglip_rows: Callable[..., torch.Tensor]  # (a (n,D), b (N,D), scale, bias, offset, tile) -> (n,) row sums


TORCH_OPS = LossOps(
    name="tiled",
    infonce_rows=_InfoNCERows.apply,
    infonce_global=_InfoNCEGlobal.apply,
    siglip_rows=_SigLIPRows.apply,
)


def _is_global(image_rows, text_rows, image_cols, text_cols, row_offset: int) -> bool:
    """True when rows are the columns themselves (single process, or a global loss over gathered features)."""
    return row_offset == 0 and image_rows is image_cols and text_rows is text_cols


def clip_terms(
    ops: LossOps,
    image_rows: torch.Tensor,
    text_rows: torch.Tensor,
    image_cols: torch.Tensor,
    text_cols: torch.Tensor,
    logit_scale: torch.Tensor,
    row_offset: int,
    tile: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) image->text and (n,) text->image cross-entropies of the local rows, with the backend ``ops``."""
    if _is_global(image_rows, text_rows, image_cols, text_cols, row_offset):
        return ops.infonce_global(image_rows, text_rows, logit_scale, tile)  # (N,), (N,)
    ce_i2t = ops.infonce_rows(image_rows, text_cols, logit_scale, row_offset, tile)  # (n,)
    ce_t2i = ops.infonce_rows(text_rows, image_cols, logit_scale, row_offset, tile)  # (n,)
    return ce_i2t, ce_t2i


def clip_loss_with(ops: LossOps, image_rows, text_rows, image_cols, text_cols, logit_scale, row_offset, tile):
    """:func:`vlalign.losses.functional.clip_loss_local` computed by the backend ``ops``."""
    check_local_inputs(
        {"image_rows": image_rows, "text_rows": text_rows},
        {"image_cols": image_cols, "text_cols": text_cols},
        {"logit_scale": logit_scale},
        row_offset,
    )
    ce_i2t, ce_t2i = clip_terms(
        ops, image_rows, text_rows, image_cols, text_cols, logit_scale, row_offset, _check_tile(tile)
    )
    return 0.5 * (ce_i2t.mean() + ce_t2i.mean())  # ()


def siglip_loss_with(ops: LossOps, image_rows, text_cols, logit_scale, logit_bias, row_offset, tile):
    """:func:`vlalign.losses.functional.siglip_loss_local` computed by the backend ``ops``."""
    n, _ = check_local_inputs(
        {"image_rows": image_rows},
        {"text_cols": text_cols},
        {"logit_scale": logit_scale, "logit_bias": logit_bias},
        row_offset,
    )
    per_row = ops.siglip_rows(image_rows, text_cols, logit_scale, logit_bias, row_offset, _check_tile(tile))  # (n,)
    return per_row.sum() / n  # ()


def weighted_clip_loss_with(
    ops: LossOps, image_rows, text_rows, image_cols, text_cols, logit_scale, weights_rows, row_offset, tile
):
    """:func:`vlalign.losses.functional.weighted_clip_loss_local` computed by the backend ``ops``."""
    n, big_n = check_local_inputs(
        {"image_rows": image_rows, "text_rows": text_rows},
        {"image_cols": image_cols, "text_cols": text_cols},
        {"logit_scale": logit_scale},
        row_offset,
        weights_rows,
    )
    ce_i2t, ce_t2i = clip_terms(
        ops, image_rows, text_rows, image_cols, text_cols, logit_scale, row_offset, _check_tile(tile)
    )
    weights = weights_rows.detach().to(ce_i2t.dtype)  # (n,)
    return (big_n / n) * (weights * 0.5 * (ce_i2t + ce_t2i)).sum()  # ()


def tiled_clip_loss_local(
    image_rows: torch.Tensor,
    text_rows: torch.Tensor,
    image_cols: torch.Tensor,
    text_cols: torch.Tensor,
    logit_scale: torch.Tensor,
    row_offset: int = 0,
    tile: int = 1024,
) -> torch.Tensor:
    """Tiled :func:`~vlalign.losses.functional.clip_loss_local` (same formula), one tile of logits at a time.

    ``L = 1/(2n) * sum_i [CE(s x_i @ Y.T, o+i) + CE(s y_i @ X.T, o+i)]``; rows (n, D), cols (N, D) -> ().
    """
    return clip_loss_with(TORCH_OPS, image_rows, text_rows, image_cols, text_cols, logit_scale, row_offset, tile)


def tiled_siglip_loss_local(
    image_rows: torch.Tensor,
    text_cols: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    row_offset: int = 0,
    tile: int = 1024,
) -> torch.Tensor:
    """Tiled :func:`~vlalign.losses.functional.siglip_loss_local` (same formula), one tile of logits at a time.

    ``L = -(1/n) * sum_i sum_j log sigmoid(z_ij (s x_i . y_j + b))``; rows (n, D), cols (N, D) -> ().
    """
    return siglip_loss_with(TORCH_OPS, image_rows, text_cols, logit_scale, logit_bias, row_offset, tile)


def tiled_weighted_clip_loss_local(
    image_rows: torch.Tensor,
    text_rows: torch.Tensor,
    image_cols: torch.Tensor,
    text_cols: torch.Tensor,
    logit_scale: torch.Tensor,
    weights_rows: torch.Tensor,
    row_offset: int = 0,
    tile: int = 1024,
) -> torch.Tensor:
    """Tiled :func:`~vlalign.losses.functional.weighted_clip_loss_local` (same formula, weights detached).

    ``L = (N/n) * sum_i w_i * 1/2 * [CE_i2t(i) + CE_t2i(i)]``; rows (n, D), cols (N, D), weights (n,) -> ().
    """
    return weighted_clip_loss_with(
        TORCH_OPS, image_rows, text_rows, image_cols, text_cols, logit_scale, weights_rows, row_offset, tile
    )
