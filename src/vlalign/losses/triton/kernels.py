"""Triton kernels of the tiled contrastive losses. Imported lazily: this module imports triton at the top.

Every kernel walks one block of ``BLOCK_M`` rows of ``a`` (n_a, D) against all of ``b`` (n_b, D), ``BLOCK_N``
columns at a time, with the whole feature dimension in one ``BLOCK_D`` block (D padded to a power of two,
>= 16). Logits ``s * a_i . b_j`` exist only as a (BLOCK_M, BLOCK_N) block in registers; ``tl.dot`` accumulates
in fp32 (fp64 for fp64 inputs, interpreter only), whatever the input dtype.

* :func:`row_lse_kernel`: per-row log-sum-exp with the online max and rescaled sum of flash attention.
* :func:`infonce_bwd_kernel`: ``dA = s * G @ B`` for ``G_ij = g_i p_ij (row terms) + h_j q_ij (column terms)``,
  recomputing the probabilities p, q from the saved log-sum-exps; the column gradient ``dB`` is the same kernel
  on the transposed problem (a and b swapped, row and column terms swapped), so there are no atomics and the
  result is deterministic. It also writes per-row partial sums of ``G_ij * a_i . b_j`` for ``dL/ds``.
* :func:`siglip_fwd_kernel` / :func:`siglip_bwd_kernel`: the same for the pairwise sigmoid loss, whose positive
  pairs are ``row + row_shift == col + col_shift``.

``EMULATE_LOWP`` (interpreter only): the Triton 3.8 interpreter returns garbage for ``tl.dot`` of bf16 blocks (values
~1e10, as if it multiplied the raw 16-bit patterns), so under the interpreter bf16/fp16 blocks are widened to fp32 right before
each ``tl.dot``; everything else (loads, the bf16 rounding of the probabilities) is the GPU code path.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _log1p(x):
    """log(1 + x) to full precision for small x (Goldberg's trick: log(u) * x / (u - 1), u = 1 + x)."""
    u = 1.0 + x
    d = u - 1.0
    return tl.where(d == 0.0, x, tl.log(u) * x / tl.where(d == 0.0, 1.0, d))


@triton.jit
def _load_rows(ptr, idx, ok, ks, k_ok, dim):
    """(len(idx), BLOCK_D) block of a row-major (rows, dim) tensor; zeros outside ``ok`` and ``k_ok``."""
    offsets = idx[:, None].to(tl.int64) * dim + ks[None, :]
    return tl.load(ptr + offsets, mask=ok[:, None] & k_ok[None, :], other=0.0)


@triton.jit
def row_lse_kernel(
    a_ptr,  # (n_a, D) row-major
    b_ptr,  # (n_b, D) row-major
    scale_ptr,  # (1,) logit scale in the accumulation dtype
    lse_ptr,  # (n_a,) out: logsumexp_j(s * a_i . b_j)
    n_a,
    n_b,
    dim,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE_LOWP: tl.constexpr = False,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    ks = tl.arange(0, BLOCK_D)  # (BD,)
    row_ok = rows < n_a
    k_ok = ks < dim
    a = _load_rows(a_ptr, rows, row_ok, ks, k_ok, dim)  # (BM, BD)
    if EMULATE_LOWP:
        a = a.to(tl.float32)
    scale = tl.load(scale_ptr)
    m = tl.full([BLOCK_M], float("-inf"), scale.dtype)  # (BM,) running max
    l = tl.zeros([BLOCK_M], scale.dtype)  # (BM,) running sum of exp(logit - m)
    for start in range(0, n_b, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)  # (BN,)
        col_ok = cols < n_b
        b = _load_rows(b_ptr, cols, col_ok, ks, k_ok, dim)  # (BN, BD)
        b_mm = b
        if EMULATE_LOWP:
            b_mm = b.to(tl.float32)
        logits = tl.dot(a, tl.trans(b_mm), input_precision=PRECISION).to(scale.dtype) * scale  # (BM, BN)
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=1))  # (BM,)
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m = m_new
    tl.store(lse_ptr + rows, m + tl.log(l), mask=row_ok)


@triton.jit
def infonce_bwd_kernel(
    a_ptr,  # (n_a, D) rows
    b_ptr,  # (n_b, D) columns
    scale_ptr,  # (1,)
    lse_r_ptr,  # (n_a,) row log-sum-exps (HAS_ROW)
    g_r_ptr,  # (n_a,) dL/d(row CE) (HAS_ROW)
    lse_c_ptr,  # (n_b,) column log-sum-exps (HAS_COL)
    g_c_ptr,  # (n_b,) dL/d(column CE) (HAS_COL)
    da_ptr,  # (n_a, D) out, accumulation dtype: s * sum_j G_ij b_j
    rowds_ptr,  # (n_a,) out (WRITE_DS): sum_j G_ij a_i . b_j
    n_a,
    n_b,
    dim,
    HAS_ROW: tl.constexpr,
    HAS_COL: tl.constexpr,
    WRITE_DS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE_LOWP: tl.constexpr = False,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    ks = tl.arange(0, BLOCK_D)  # (BD,)
    row_ok = rows < n_a
    k_ok = ks < dim
    a = _load_rows(a_ptr, rows, row_ok, ks, k_ok, dim)  # (BM, BD)
    if EMULATE_LOWP:
        a = a.to(tl.float32)
    scale = tl.load(scale_ptr)
    if HAS_ROW:
        lse_r = tl.load(lse_r_ptr + rows, mask=row_ok, other=0.0)  # (BM,)
        g_r = tl.load(g_r_ptr + rows, mask=row_ok, other=0.0)  # (BM,)
    acc = tl.zeros([BLOCK_M, BLOCK_D], scale.dtype)  # (BM, BD) sum_j G_ij b_j
    ds = tl.zeros([BLOCK_M], scale.dtype)  # (BM,)
    for start in range(0, n_b, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)  # (BN,)
        col_ok = cols < n_b
        b = _load_rows(b_ptr, cols, col_ok, ks, k_ok, dim)  # (BN, BD)
        b_mm = b
        if EMULATE_LOWP:
            b_mm = b.to(tl.float32)
        dots = tl.dot(a, tl.trans(b_mm), input_precision=PRECISION).to(scale.dtype)  # (BM, BN)
        logits = dots * scale
        grad = tl.zeros([BLOCK_M, BLOCK_N], scale.dtype)  # (BM, BN) dL/dlogits
        if HAS_ROW:
            grad += g_r[:, None] * tl.exp(logits - lse_r[:, None])
        if HAS_COL:
            lse_c = tl.load(lse_c_ptr + cols, mask=col_ok, other=0.0)  # (BN,)
            g_c = tl.load(g_c_ptr + cols, mask=col_ok, other=0.0)  # (BN,)
            grad += g_c[None, :] * tl.exp(logits - lse_c[None, :])
        grad = tl.where(col_ok[None, :], grad, 0.0)
        grad_mm = grad.to(b.dtype)  # bf16/fp16 inputs: probabilities rounded like flash attention's P
        if EMULATE_LOWP:
            grad_mm = grad_mm.to(tl.float32)
        acc = tl.dot(grad_mm, b_mm, acc, input_precision=PRECISION)  # (BM, BD)
        if WRITE_DS:
            ds += tl.sum(grad * dots, axis=1)
    offsets = rows[:, None].to(tl.int64) * dim + ks[None, :]
    tl.store(da_ptr + offsets, acc * scale, mask=row_ok[:, None] & k_ok[None, :])
    if WRITE_DS:
        tl.store(rowds_ptr + rows, ds, mask=row_ok)


@triton.jit
def siglip_fwd_kernel(
    a_ptr,  # (n_a, D) image rows
    b_ptr,  # (n_b, D) text columns
    scale_ptr,  # (1,)
    bias_ptr,  # (1,)
    out_ptr,  # (n_a,) out: sum_j -log sigmoid(z_ij (s a_i . b_j + bias))
    n_a,
    n_b,
    dim,
    offset,  # positive of row i is column offset + i
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE_LOWP: tl.constexpr = False,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    ks = tl.arange(0, BLOCK_D)  # (BD,)
    row_ok = rows < n_a
    k_ok = ks < dim
    a = _load_rows(a_ptr, rows, row_ok, ks, k_ok, dim)  # (BM, BD)
    if EMULATE_LOWP:
        a = a.to(tl.float32)
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    total = tl.zeros([BLOCK_M], scale.dtype)  # (BM,)
    for start in range(0, n_b, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)  # (BN,)
        col_ok = cols < n_b
        b = _load_rows(b_ptr, cols, col_ok, ks, k_ok, dim)  # (BN, BD)
        b_mm = b
        if EMULATE_LOWP:
            b_mm = b.to(tl.float32)
        logits = tl.dot(a, tl.trans(b_mm), input_precision=PRECISION).to(scale.dtype) * scale + bias  # (BM, BN)
        positive = (rows[:, None] + offset) == cols[None, :]  # (BM, BN)
        x = tl.where(positive, -logits, logits)  # -z * logit
        loss = tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))  # softplus(-z l) = -log sigmoid(z l)
        total += tl.sum(tl.where(col_ok[None, :], loss, 0.0), axis=1)
    tl.store(out_ptr + rows, total, mask=row_ok)


@triton.jit
def siglip_bwd_kernel(
    a_ptr,  # (n_a, D) rows
    b_ptr,  # (n_b, D) columns
    scale_ptr,  # (1,)
    bias_ptr,  # (1,)
    g_ptr,  # (n_a,) if G_ON_ROWS else (n_b,): dL/d(per-image-row loss)
    da_ptr,  # (n_a, D) out: s * sum_j G_ij b_j
    rowds_ptr,  # (n_a,) out (WRITE_DS): sum_j G_ij a_i . b_j
    rowdb_ptr,  # (n_a,) out (WRITE_DS): sum_j G_ij
    n_a,
    n_b,
    dim,
    row_shift,  # pair (i, j) is positive when i + row_shift == j + col_shift
    col_shift,
    G_ON_ROWS: tl.constexpr,
    WRITE_DS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE_LOWP: tl.constexpr = False,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    ks = tl.arange(0, BLOCK_D)  # (BD,)
    row_ok = rows < n_a
    k_ok = ks < dim
    a = _load_rows(a_ptr, rows, row_ok, ks, k_ok, dim)  # (BM, BD)
    if EMULATE_LOWP:
        a = a.to(tl.float32)
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    if G_ON_ROWS:
        g_r = tl.load(g_ptr + rows, mask=row_ok, other=0.0)  # (BM,)
    acc = tl.zeros([BLOCK_M, BLOCK_D], scale.dtype)  # (BM, BD)
    ds = tl.zeros([BLOCK_M], scale.dtype)  # (BM,)
    db = tl.zeros([BLOCK_M], scale.dtype)  # (BM,)
    for start in range(0, n_b, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)  # (BN,)
        col_ok = cols < n_b
        b = _load_rows(b_ptr, cols, col_ok, ks, k_ok, dim)  # (BN, BD)
        b_mm = b
        if EMULATE_LOWP:
            b_mm = b.to(tl.float32)
        dots = tl.dot(a, tl.trans(b_mm), input_precision=PRECISION).to(scale.dtype)  # (BM, BN)
        logits = dots * scale + bias
        positive = (rows[:, None] + row_shift) == (cols[None, :] + col_shift)  # (BM, BN)
        # d/dl of -log sigmoid(-l) is sigmoid(l) (negatives); of -log sigmoid(l) it is -sigmoid(-l) (positives)
        grad = tl.where(positive, -1.0 / (1.0 + tl.exp(logits)), 1.0 / (1.0 + tl.exp(-logits)))  # (BM, BN)
        if G_ON_ROWS:
            grad = grad * g_r[:, None]
        else:
            g_c = tl.load(g_ptr + cols, mask=col_ok, other=0.0)  # (BN,)
            grad = grad * g_c[None, :]
        grad = tl.where(col_ok[None, :] & row_ok[:, None], grad, 0.0)
        grad_mm = grad.to(b.dtype)  # bf16/fp16 inputs: probabilities rounded like flash attention's P
        if EMULATE_LOWP:
            grad_mm = grad_mm.to(tl.float32)
        acc = tl.dot(grad_mm, b_mm, acc, input_precision=PRECISION)  # (BM, BD)
        if WRITE_DS:
            ds += tl.sum(grad * dots, axis=1)
            db += tl.sum(grad, axis=1)
    offsets = rows[:, None].to(tl.int64) * dim + ks[None, :]
    tl.store(da_ptr + offsets, acc * scale, mask=row_ok[:, None] & k_ok[None, :])
    if WRITE_DS:
        tl.store(rowds_ptr + rows, ds, mask=row_ok)
        tl.store(rowdb_ptr + rows, db, mask=row_ok)
