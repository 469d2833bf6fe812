"""Autograd Functions and public wrappers over the Triton kernels (same signatures as the tiled losses).

The wrappers reuse the loss assembly of :mod:`vlalign.losses.tiled` (per-row cross-entropies, weights,
global-form detection); only the three primitives differ. Blocks: on CUDA each kernel is autotuned over a few
``(BLOCK_M, BLOCK_N, num_warps)`` configs per feature dimension (``VLALIGN_TRITON_AUTOTUNE=0`` uses the first
config instead); under the interpreter fixed 16 x 16 blocks keep the tests fast. ``tile`` is accepted for the
common signature and ignored: the kernel blocks are the tiles.

Positive logits ``s * a_i . b_{o+i}`` and their gradient are O(n * D) and computed with torch, chunked, in the
accumulation dtype (see :func:`vlalign.losses.tiled._positive_dots`).
"""

from __future__ import annotations

import functools
import os

import torch

from vlalign.errors import ConfigError
from vlalign.losses import tiled
from vlalign.losses.tiled import LossOps, acc_dtype

__all__ = [
    "TRITON_OPS",
    "triton_clip_loss_local",
    "triton_siglip_loss_local",
    "triton_unavailable_reason",
    "triton_weighted_clip_loss_local",
]

_CHUNK = 16384  # rows per chunk of the O(n * D) positive-pair terms computed in torch


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (None when they can)."""
    from vlalign.losses.triton import HAS_TRITON, interpreting

    if not HAS_TRITON:
        return "triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if interpreting():
        return None if device.type == "cpu" else f"the Triton interpreter runs on CPU tensors, not {device.type}"
    return (
        f"the Triton kernels need a CUDA device (the features are on {device.type}); on a CPU they run only "
        "under the interpreter (TRITON_INTERPRET=1 set before triton is imported, for tests)"
    )


def _require(t: torch.Tensor) -> None:
    reason = triton_unavailable_reason(t.device)
    if reason is not None:
        raise ConfigError(f"loss_impl=triton: {reason}. Use loss_impl: tiled or auto.")


def _block_d(dim: int) -> int:
    return max(16, 1 << (dim - 1).bit_length())


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 unless torch allows TF32 for matmuls (as torch itself does)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "ieee" if dtype == torch.float64 else "tf32"


def _configs(block_d: int) -> list:
    """Autotune candidates for a feature block of ``block_d``: smaller row blocks when D is large (registers)."""
    import triton

    shapes = [(64, 64, 4), (64, 64, 8), (64, 32, 4), (32, 64, 4), (128, 64, 8), (128, 32, 8)]
    if block_d >= 512:
        shapes = [(64, 32, 8), (32, 64, 4), (32, 32, 4), (64, 64, 8), (16, 64, 4)]
    elif block_d >= 256:
        shapes = [(64, 64, 8), (64, 32, 4), (32, 64, 4), (128, 32, 8)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=2) for m, n, w in shapes]


@functools.lru_cache(maxsize=None)
def _kernel(name: str, block_d: int, tuned: bool):
    """The jitted kernel ``name``, wrapped in ``triton.autotune`` (keyed on the feature dim) when ``tuned``."""
    import triton

    from vlalign.losses.triton import kernels

    fn = getattr(kernels, name)
    if not tuned:
        return fn
    return triton.autotune(configs=_configs(block_d), key=["dim"])(fn)


def _launch(name: str, n_rows: int, dim: int, *args, **constexprs) -> None:
    """Launch kernel ``name`` over ``n_rows`` rows: autotuned on CUDA, fixed 16 x 16 blocks in the interpreter."""
    from vlalign.losses.triton import interpreting

    block_d = _block_d(dim)
    if interpreting():
        kernel = _kernel(name, block_d, False)
        lowp = args[0].dtype in (torch.bfloat16, torch.float16)  # args[0]: the row features
        if lowp:
            constexprs = {**constexprs, "PRECISION": "ieee", "EMULATE_LOWP": True}
        kernel[(max(1, -(-n_rows // 16)),)](*args, BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, **constexprs)
        return
    tuned = os.environ.get("VLALIGN_TRITON_AUTOTUNE", "1") != "0"
    kernel = _kernel(name, block_d, tuned)
    if tuned:
        kernel[lambda meta: (max(1, -(-n_rows // meta["BLOCK_M"])),)](*args, BLOCK_D=block_d, **constexprs)
    else:
        cfg = _configs(block_d)[0]
        grid = (max(1, -(-n_rows // cfg.kwargs["BLOCK_M"])),)
        kernel[grid](*args, **cfg.kwargs, BLOCK_D=block_d, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                     **constexprs)


def _scalar(t: torch.Tensor, acc: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 0-d scale or bias as a (1,) tensor of the accumulation dtype on the kernels' device."""
    return t.detach().to(device=device, dtype=acc).reshape(1).contiguous()  # (1,)


def _row_lse(a: torch.Tensor, b: torch.Tensor, scale1: torch.Tensor) -> torch.Tensor:
    """(n_a,) logsumexp_j(s * a_i . b_j); a (n_a, D), b (n_b, D) contiguous."""
    lse = torch.empty(a.shape[0], dtype=scale1.dtype, device=a.device)  # (n_a,)
    _launch("row_lse_kernel", a.shape[0], a.shape[1], a, b, scale1, lse, a.shape[0], b.shape[0], a.shape[1],
            PRECISION=_precision(a.dtype))
    return lse


def _infonce_grad(a, b, scale1, row=None, col=None, write_ds=True):
    """``(s * G @ b (n_a, D), per-row sum_j G_ij a_i . b_j (n_a,))`` for row terms ``row = (lse, g)`` on a's
    rows and column terms ``col = (lse, g)`` on b's rows."""
    acc = scale1.dtype
    da = torch.empty(a.shape, dtype=acc, device=a.device)  # (n_a, D)
    rowds = torch.empty(a.shape[0] if write_ds else 1, dtype=acc, device=a.device)  # (n_a,)
    dummy = rowds
    lse_r, g_r = row if row is not None else (dummy, dummy)
    lse_c, g_c = col if col is not None else (dummy, dummy)
    _launch("infonce_bwd_kernel", a.shape[0], a.shape[1], a, b, scale1, lse_r, g_r, lse_c, g_c, da, rowds,
            a.shape[0], b.shape[0], a.shape[1], HAS_ROW=row is not None, HAS_COL=col is not None,
            WRITE_DS=write_ds, PRECISION=_precision(a.dtype))
    return da, rowds


class _TritonInfoNCERows(torch.autograd.Function):
    """Triton version of ``tiled._InfoNCERows``: a (n, D), b (N, D) -> (n,) CE_i."""

    @staticmethod
    def forward(ctx, a, b, scale, offset: int, tile: int):  # type: ignore[override]
        _require(a)
        acc = acc_dtype(a.dtype)
        a, b = a.contiguous(), b.contiguous()
        scale1 = _scalar(scale, acc, a.device)  # (1,)
        lse = _row_lse(a, b, scale1)  # (n,)
        ce = lse - float(scale) * tiled._positive_dots(a, b, offset, _CHUNK, acc)  # (n,)
        ctx.save_for_backward(a, b, scale, lse)
        ctx.offset = offset
        return ce

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        a, b, scale, lse = ctx.saved_tensors
        acc = lse.dtype
        scale1 = _scalar(scale, acc, a.device)
        g = g.to(acc).contiguous()  # (n,)
        grad_a, rowds = _infonce_grad(a, b, scale1, row=(lse, g))  # (n, D), (n,)
        grad_b, _ = _infonce_grad(b, a, scale1, col=(lse, g), write_ds=False)  # (N, D)
        ds = rowds.sum() + tiled._positive_backward(a, b, g, ctx.offset, float(scale), _CHUNK, grad_a, grad_b)
        return grad_a.to(a.dtype), grad_b.to(b.dtype), ds.to(scale.dtype).reshape(scale.shape), None, None


class _TritonInfoNCEGlobal(torch.autograd.Function):
    """Triton version of ``tiled._InfoNCEGlobal``: a, b (N, D) -> row CEs (N,), column CEs (N,)."""

    @staticmethod
    def forward(ctx, a, b, scale, tile: int):  # type: ignore[override]
        _require(a)
        acc = acc_dtype(a.dtype)
        a, b = a.contiguous(), b.contiguous()
        scale1 = _scalar(scale, acc, a.device)
        row_lse = _row_lse(a, b, scale1)  # (N,) image -> text
        col_lse = _row_lse(b, a, scale1)  # (N,) text -> image: rows of S.T
        pos = float(scale) * tiled._positive_dots(a, b, 0, _CHUNK, acc)  # (N,)
        ctx.save_for_backward(a, b, scale, row_lse, col_lse)
        return row_lse - pos, col_lse - pos

    @staticmethod
    def backward(ctx, g_row, g_col):  # type: ignore[override]
        a, b, scale, row_lse, col_lse = ctx.saved_tensors
        acc = row_lse.dtype
        scale1 = _scalar(scale, acc, a.device)
        g_row = torch.zeros_like(row_lse) if g_row is None else g_row.to(acc).contiguous()  # (N,)
        g_col = torch.zeros_like(col_lse) if g_col is None else g_col.to(acc).contiguous()  # (N,)
        grad_a, rowds = _infonce_grad(a, b, scale1, row=(row_lse, g_row), col=(col_lse, g_col))  # (N, D), (N,)
        grad_b, _ = _infonce_grad(b, a, scale1, row=(col_lse, g_col), col=(row_lse, g_row), write_ds=False)
        ds = rowds.sum() + tiled._positive_backward(a, b, g_row + g_col, 0, float(scale), _CHUNK, grad_a, grad_b)
        return grad_a.to(a.dtype), grad_b.to(b.dtype), ds.to(scale.dtype).reshape(scale.shape), None


class _TritonSigLIPRows(torch.autograd.Function):
    """Triton version of ``tiled._SigLIPRows``: a (n, D), b (N, D) -> (n,) per-row sums of -log sigmoid."""

    @staticmethod
    def forward(ctx, a, b, scale, bias, offset: int, tile: int):  # type: ignore[override]
        _require(a)
        acc = acc_dtype(a.dtype)
        a, b = a.contiguous(), b.contiguous()
        scale1, bias1 = _scalar(scale, acc, a.device), _scalar(bias, acc, a.device)
        out = torch.empty(a.shape[0], dtype=acc, device=a.device)  # (n,)
        _launch("siglip_fwd_kernel", a.shape[0], a.shape[1], a, b, scale1, bias1, out, a.shape[0], b.shape[0],
                a.shape[1], offset, PRECISION=_precision(a.dtype))
        ctx.save_for_backward(a, b, scale, bias)
        ctx.offset = offset
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        a, b, scale, bias = ctx.saved_tensors
        acc = acc_dtype(a.dtype)
        scale1, bias1 = _scalar(scale, acc, a.device), _scalar(bias, acc, a.device)
        g = g.to(acc).contiguous()  # (n,)
        n, big_n, dim = a.shape[0], b.shape[0], a.shape[1]
        grad_a = torch.empty(a.shape, dtype=acc, device=a.device)  # (n, D)
        grad_b = torch.empty(b.shape, dtype=acc, device=a.device)  # (N, D)
        rowds = torch.empty(n, dtype=acc, device=a.device)  # (n,)
        rowdb = torch.empty(n, dtype=acc, device=a.device)  # (n,)
        precision = _precision(a.dtype)
        _launch("siglip_bwd_kernel", n, dim, a, b, scale1, bias1, g, grad_a, rowds, rowdb, n, big_n, dim,
                ctx.offset, 0, G_ON_ROWS=True, WRITE_DS=True, PRECISION=precision)
        _launch("siglip_bwd_kernel", big_n, dim, b, a, scale1, bias1, g, grad_b, rowds, rowdb, big_n, n, dim,
                0, ctx.offset, G_ON_ROWS=False, WRITE_DS=False, PRECISION=precision)
        return (
            grad_a.to(a.dtype),
            grad_b.to(b.dtype),
            rowds.sum().to(scale.dtype).reshape(scale.shape),
            rowdb.sum().to(bias.dtype).reshape(bias.shape),
            None,
            None,
        )


def _autocast_features(*features: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast, fp32 features go to the autocast dtype, as autocast does for the naive loss's matmul.

    The kernels then run bf16/fp16 tensor-core dots with fp32 accumulation; the cast is differentiable, so the
    gradients flow back to the fp32 features. Outside autocast the features are used as they are.
    """
    if not features or not torch.is_autocast_enabled(features[0].device.type):
        return features
    target = torch.get_autocast_dtype(features[0].device.type)
    return tuple(f.to(target) if f.dtype == torch.float32 else f for f in features)


def _autocast_features_keep_identity(image_rows, text_rows, image_cols, text_cols):
    """:func:`_autocast_features` that keeps ``rows is cols`` (the global form) true after the cast."""
    if image_rows is image_cols and text_rows is text_cols:
        image, text = _autocast_features(image_rows, text_rows)
        return image, text, image, text
    return _autocast_features(image_rows, text_rows, image_cols, text_cols)


TRITON_OPS = LossOps(
    name="triton",
    infonce_rows=_TritonInfoNCERows.apply,
    infonce_global=_TritonInfoNCEGlobal.apply,
    siglip_rows=_TritonSigLIPRows.apply,
)


def triton_clip_loss_local(image_rows, text_rows, image_cols, text_cols, logit_scale, row_offset=0, tile=1024):
    """Triton :func:`~vlalign.losses.functional.clip_loss_local`; rows (n, D), cols (N, D) -> () fp32."""
    image_rows, text_rows, image_cols, text_cols = _autocast_features_keep_identity(
        image_rows, text_rows, image_cols, text_cols)
    return tiled.clip_loss_with(TRITON_OPS, image_rows, text_rows, image_cols, text_cols, logit_scale, row_offset,
                                tile)


def triton_siglip_loss_local(image_rows, text_cols, logit_scale, logit_bias, row_offset=0, tile=1024):
    """Triton :func:`~vlalign.losses.functional.siglip_loss_local`; rows (n, D), cols (N, D) -> () fp32."""
    image_rows, text_cols = _autocast_features(image_rows, text_cols)
    return tiled.siglip_loss_with(TRITON_OPS, image_rows, text_cols, logit_scale, logit_bias, row_offset, tile)


def triton_weighted_clip_loss_local(
    image_rows, text_rows, image_cols, text_cols, logit_scale, weights_rows, row_offset=0, tile=1024
):
    """Triton :func:`~vlalign.losses.functional.weighted_clip_loss_local`; weights (n,) detached -> () fp32."""
    image_rows, text_rows, image_cols, text_cols = _autocast_features_keep_identity(
        image_rows, text_rows, image_cols, text_cols)
    return tiled.weighted_clip_loss_with(TRITON_OPS, image_rows, text_rows, image_cols, text_cols, logit_scale,
                                         weights_rows, row_offset, tile)
