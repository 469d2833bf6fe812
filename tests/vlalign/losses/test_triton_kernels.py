"""Triton kernels against the naive losses: fp64 under the interpreter (CPU), fp32/bf16 on a CUDA GPU.

These tests need either a CUDA device or ``TRITON_INTERPRET=1`` set before triton is imported. In a normal
CPU test session they skip, and ``test_triton_interpreter.py`` runs this file in a subprocess with the
interpreter on; ``benchmarks/gpu_check.sh`` runs it on a GPU (``-m gpu``).
"""

from __future__ import annotations

import pytest
import torch
from loss_cases import KINDS, NAIVE, Problem, features, max_errors, value_and_grads

from vlalign.losses.triton import HAS_TRITON, interpreting

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not HAS_TRITON or not (interpreting() or torch.cuda.is_available()),
        reason="needs CUDA or TRITON_INTERPRET=1 (test_triton_interpreter.py runs this file under the interpreter)",
    ),
]

DEVICE = "cpu" if interpreting() else "cuda"


def _triton():
    from vlalign.losses.triton import (
        triton_clip_loss_local,
        triton_siglip_loss_local,
        triton_weighted_clip_loss_local,
    )

    return {"clip": triton_clip_loss_local, "siglip": triton_siglip_loss_local,
            "weighted_clip": triton_weighted_clip_loss_local}


def _on(p: Problem, device: str, dtype: torch.dtype | None = None) -> Problem:
    dtype = dtype or p.image.dtype
    return Problem.make(p.image.shape[0], p.image.shape[1], image=p.image.detach().to(device, dtype),
                        text=p.text.detach().to(device, dtype), scale=float(p.scale.detach()), bias=float(p.bias.detach()))


def _ties(n: int, d: int) -> Problem:
    image, text = features(3, d, seed=11)
    index = torch.arange(n) % 3
    return Problem.make(n, d, image=image[index], text=text[index], scale=20.0, bias=-4.0)


# Kernel blocks are 16 x 16 under the interpreter: 37 rows = 3 blocks, the last one partial.
CASES = {
    "N=1": lambda: Problem.make(1, 4, seed=0),
    "N=7,D=5": lambda: Problem.make(7, 5, seed=1, scale=9.0, bias=-2.0),
    "N=37,D=20": lambda: Problem.make(37, 20, seed=2),
    "ties N=19": lambda: _ties(19, 6),
    "scale=100 anti-aligned": lambda: Problem.make(
        6, 4, image=features(6, 4, 4)[0], text=-features(6, 4, 4)[0], scale=100.0, bias=5.0),
}


@pytest.mark.skipif(not interpreting(), reason="fp64 kernels are checked under the interpreter")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(CASES))
def test_triton_global_form_matches_naive_fp64(kind: str, case: str) -> None:
    p = CASES[case]()
    got = value_and_grads(kind, _triton(), p)
    want = value_and_grads(kind, NAIVE, p)
    value_err, grad_err = max_errors(got, want)
    assert value_err < 1e-12 and grad_err < 1e-12, (value_err, grad_err)


@pytest.mark.skipif(not interpreting(), reason="fp64 kernels are checked under the interpreter")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [slice(0, 17), slice(17, 34), slice(30, 34)])
def test_triton_local_form_matches_naive_fp64(kind: str, rows: slice) -> None:
    p = Problem.make(34, 6, seed=5, scale=12.0, bias=-3.0)
    value_err, grad_err = max_errors(value_and_grads(kind, _triton(), p, rows=rows),
                                     value_and_grads(kind, NAIVE, p, rows=rows))
    assert value_err < 1e-12 and grad_err < 1e-12, (value_err, grad_err)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_low_precision_is_close_to_fp64(kind: str, dtype: torch.dtype) -> None:
    """fp32 / bf16 features: fp32 loss within rounding of the fp64 loss of the same (rounded) features."""
    n = 300 if DEVICE == "cuda" else 21
    base = Problem.make(n, 32, seed=6, scale=14.0, bias=-5.0)
    low = _on(base, DEVICE, dtype)
    ref = _on(low, "cpu", torch.float64)  # the rounded features, in fp64
    loss, grads = value_and_grads(kind, _triton(), low)
    want, want_grads = value_and_grads(kind, NAIVE, ref)
    assert loss.dtype == torch.float32 and grads[0].dtype == dtype
    tol = 2e-5 if dtype == torch.float32 else 2e-2  # bf16: the kernel feeds bf16 probabilities to tl.dot
    assert abs(float(loss) - float(want)) <= tol * max(1.0, abs(float(want)))
    for g, w in zip(grads, want_grads):
        scale = float(w.abs().max()) + 1e-12
        assert float((g.double().cpu() - w).abs().max()) <= tol * 10 * scale, kind


@pytest.mark.skipif(DEVICE != "cuda", reason="a GPU-sized check; the interpreter is too slow for it")
@pytest.mark.parametrize("kind", KINDS)
def test_triton_matches_naive_fp64_at_a_few_thousand(kind: str) -> None:
    base = Problem.make(3000, 256, seed=7, scale=1 / 0.07, bias=-10.0)
    low = _on(base, "cuda", torch.float32)
    loss, grads = value_and_grads(kind, _triton(), low)
    want, want_grads = value_and_grads(kind, NAIVE, _on(base, "cuda", torch.float64))
    assert abs(float(loss) - float(want)) < 1e-4 * max(1.0, abs(float(want)))
    for g, w in zip(grads, want_grads):
        assert float((g.double() - w).abs().max()) < 1e-3 * (float(w.abs().max()) + 1e-12)


@pytest.mark.parametrize("kind", ["clip", "siglip"])  # (DAA weights would differ: computed from other features)
def test_triton_under_autocast_runs_on_autocast_dtype_features(kind: str) -> None:
    """fp32 features under bf16 autocast give the bf16-feature loss, and fp32 gradients reach the features."""
    n = 300 if DEVICE == "cuda" else 20
    p32 = _on(Problem.make(n, 16, seed=8, scale=10.0, bias=-4.0), DEVICE, torch.float32)
    p16 = _on(p32, DEVICE, torch.bfloat16)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss, grads = value_and_grads(kind, _triton(), p32)
    want, _ = value_and_grads(kind, _triton(), p16)
    assert loss.dtype == torch.float32 and grads[0].dtype == torch.float32
    assert abs(float(loss) - float(want)) < 1e-5 * max(1.0, abs(float(want)))
