"""Tiled losses against the naive ones in fp64: values and every gradient, at awkward sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from loss_cases import KINDS, NAIVE, Problem, features, graph_node_names, max_errors, value_and_grads

from vlalign.errors import LossInputError
from vlalign.losses.tiled import tiled_clip_loss_local, tiled_siglip_loss_local, tiled_weighted_clip_loss_local

TILED = {
    "clip": tiled_clip_loss_local,
    "siglip": tiled_siglip_loss_local,
    "weighted_clip": tiled_weighted_clip_loss_local,
}
TOL = 1e-12


def _ties(n: int, d: int) -> Problem:
    """Duplicated images and texts: equal logits inside rows and columns, and equal positives."""
    image, text = features(3, d, seed=11)
    index = torch.arange(n) % 3  # (n,) every feature repeated
    return Problem.make(n, d, image=image[index], text=text[index], scale=20.0, bias=-4.0)


CASES = {
    "N=1": (lambda: Problem.make(1, 4, seed=0), 4),
    "N=10,tile=4 (not divisible)": (lambda: Problem.make(10, 6, seed=1), 4),
    "N=7,tile=1": (lambda: Problem.make(7, 3, seed=2, scale=3.0), 1),
    "N=5,tile=64 (tile > N)": (lambda: Problem.make(5, 8, seed=3), 64),
    "ties N=9,tile=4": (lambda: _ties(9, 5), 4),
    "scale=100, anti-aligned": (
        lambda: Problem.make(6, 4, image=features(6, 4, 4)[0], text=-features(6, 4, 4)[0], scale=100.0, bias=5.0),
        4,
    ),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(CASES))
def test_tiled_global_form_matches_naive(kind: str, case: str) -> None:
    make, tile = CASES[case]
    p = make()
    value_err, grad_err = max_errors(value_and_grads(kind, TILED, p, tile=tile), value_and_grads(kind, NAIVE, p))
    assert value_err < TOL and grad_err < TOL, (value_err, grad_err)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [slice(0, 4), slice(4, 8), slice(8, 11), slice(3, 4)])
def test_tiled_local_form_matches_naive(kind: str, rows: slice) -> None:
    """Local rows at an offset inside the gathered columns; the tile (3) straddles the row blocks."""
    p = Problem.make(11, 5, seed=5, scale=12.0, bias=-3.0)
    got = value_and_grads(kind, TILED, p, rows=rows, tile=3)
    want = value_and_grads(kind, NAIVE, p, rows=rows)
    value_err, grad_err = max_errors(got, want)
    assert value_err < TOL and grad_err < TOL, (value_err, grad_err)


def test_global_form_is_detected_and_equals_the_local_path() -> None:
    """rows *is* cols takes the fused one-sweep path; equal copies take the two-direction path: same numbers."""
    p = Problem.make(9, 4, seed=6)
    fused = tiled_clip_loss_local(p.image, p.text, p.image, p.text, p.scale, tile=4)
    split = tiled_clip_loss_local(p.image, p.text, p.image.clone(), p.text.clone(), p.scale, tile=4)
    assert "_InfoNCEGlobalBackward" in graph_node_names(fused)
    assert "_InfoNCERowsBackward" in graph_node_names(split) and "_InfoNCEGlobalBackward" not in graph_node_names(split)
    assert abs(float(fused.detach()) - float(split.detach())) < TOL


@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_inputs_accumulate_in_fp32(kind: str) -> None:
    """bf16 features: an fp32 loss close to the fp64 loss of the same (rounded) features; bf16 gradients."""
    p16 = Problem.make(12, 16, seed=7, dtype=torch.bfloat16, scale=14.0, bias=-5.0)
    p64 = Problem.make(12, 16, image=p16.image.double(), text=p16.text.double(), scale=14.0, bias=-5.0)
    loss = TILED[kind](*_args(kind, p16), tile=5)
    assert loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, p16.leaves(kind))
    assert grads[0].dtype == torch.bfloat16 and grads[2].dtype == torch.float32
    want, want_grads = value_and_grads(kind, NAIVE, p64)
    assert abs(float(loss.detach()) - float(want)) < 1e-4 * max(1.0, abs(float(want)))
    assert abs(float(grads[2]) - float(want_grads[2])) < 1e-3 * max(1.0, abs(float(want_grads[2])))


def test_autocast_does_not_lower_the_tile_precision() -> None:
    p = Problem.make(10, 8, seed=8, dtype=torch.float32)
    exact = tiled_clip_loss_local(p.image, p.text, p.image, p.text, p.scale, tile=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = tiled_clip_loss_local(p.image, p.text, p.image, p.text, p.scale, tile=4)
    assert under.dtype == torch.float32 and abs(float(under.detach()) - float(exact.detach())) < 1e-6


def _args(kind: str, p: Problem) -> tuple:
    if kind == "clip":
        return p.image, p.text, p.image, p.text, p.scale
    if kind == "siglip":
        return p.image, p.text, p.scale, p.bias
    from vlalign.losses.functional import daa_weights

    return p.image, p.text, p.image, p.text, p.scale, daa_weights(p.image, p.text)


@pytest.mark.parametrize("kind", KINDS)
def test_nothing_n_by_n_is_saved_for_backward(kind: str) -> None:
    """The tiled autograd graph saves O(N * D) tensors; the naive one saves the (N, N) logits (so this can fail)."""
    n, d, tile = 64, 8, 16

    def largest_saved(fns: dict) -> int:
        sizes = []
        p = Problem.make(n, d, seed=9)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            extra = {"tile": tile} if fns is TILED else {}
            fns[kind](*_args(kind, p), **extra)
        return max(sizes)

    assert largest_saved(TILED) <= n * d
    assert largest_saved(NAIVE) >= n * n


def test_bad_tile_is_rejected() -> None:
    p = Problem.make(4, 3)
    with pytest.raises(LossInputError, match="tile"):
        tiled_clip_loss_local(p.image, p.text, p.image, p.text, p.scale, tile=0)


def test_gradients_flow_through_upstream_layers() -> None:
    """The Function composes with autograd: a projection head upstream gets the same gradient as naive."""
    gen = torch.Generator().manual_seed(10)
    raw = torch.randn(13, 6, generator=gen, dtype=torch.float64)  # (N, 6)
    head = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)  # (6, 4)
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)

    def grads(fn, **extra):
        x = F.normalize(raw @ head, dim=-1)  # (N, 4)
        y = F.normalize(raw.flip(0) @ head, dim=-1)  # (N, 4)
        return torch.autograd.grad(fn(x, y, x, y, scale, **extra), [head, scale])

    for a, b in zip(grads(tiled_clip_loss_local, tile=5), grads(NAIVE["clip"])):
        assert torch.allclose(a, b, atol=TOL)
