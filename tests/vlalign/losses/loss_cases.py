"""Shared helpers of the loss tests: seeded features, direct (loop) implementations, gradient comparison.

Imported by the test modules of this folder (pytest puts the folder on sys.path); not collected itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlalign.losses import functional

KINDS = ("clip", "siglip", "weighted_clip")


def features(n: int, d: int, seed: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded unit image (n, d) and text (n, d) features, text correlated with its image."""
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1)  # (n, d)
    text = F.normalize(image + 0.8 * torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1)  # (n, d)
    return image.to(dtype), text.to(dtype)


@dataclass
class Problem:
    """One global batch: leaves with gradient, in the dtype of the features."""

    image: torch.Tensor  # (N, D)
    text: torch.Tensor  # (N, D)
    scale: torch.Tensor  # ()
    bias: torch.Tensor  # ()

    @classmethod
    def make(cls, n, d, seed=0, dtype=torch.float64, scale=1 / 0.07, bias=-10.0, image=None, text=None):
        if image is None:
            image, text = features(n, d, seed, dtype)
        scalar_dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
        return cls(
            image.detach().clone().requires_grad_(),
            text.detach().clone().requires_grad_(),
            torch.tensor(scale, dtype=scalar_dtype, device=image.device, requires_grad=True),
            torch.tensor(bias, dtype=scalar_dtype, device=image.device, requires_grad=True),
        )

    def leaves(self, kind: str) -> list[torch.Tensor]:
        return [self.image, self.text, self.scale] + ([self.bias] if kind == "siglip" else [])


def call(kind: str, fns: dict, p: Problem, rows: slice | None = None, **extra) -> torch.Tensor:
    """Loss ``kind`` with ``fns[kind]`` on problem ``p``; ``rows`` selects the local rows (local form)."""
    x, y = p.image, p.text
    offset = 0
    if rows is not None:
        offset = rows.start
        xr, yr = x[rows], y[rows]
    else:
        xr, yr = x, y
    if kind == "clip":
        return fns[kind](xr, yr, x, y, p.scale, row_offset=offset, **extra)
    if kind == "siglip":
        return fns[kind](xr, y, p.scale, p.bias, row_offset=offset, **extra)
    weights = functional.daa_weights(x, y)[offset : offset + xr.shape[0]]  # (n,)
    return fns[kind](xr, yr, x, y, p.scale, weights, row_offset=offset, **extra)


def value_and_grads(kind: str, fns: dict, p: Problem, rows: slice | None = None, **extra):
    loss = call(kind, fns, p, rows, **extra)
    grads = torch.autograd.grad(loss, p.leaves(kind))
    return loss.detach(), [g.detach() for g in grads]


def max_errors(a, b) -> tuple[float, float]:
    """(|loss_a - loss_b|, max over gradients of max |ga - gb|), compared in fp64."""
    (la, ga), (lb, gb) = a, b
    value_err = abs(float(la.double()) - float(lb.double()))
    grad_err = max(float((x.double() - y.double()).abs().max()) for x, y in zip(ga, gb))
    return value_err, grad_err


NAIVE = {
    "clip": functional.clip_loss_local,
    "siglip": functional.siglip_loss_local,
    "weighted_clip": functional.weighted_clip_loss_local,
}


# ---- direct implementations: one pair at a time, with Python loops (tiny N only) -------------------------------


def loop_clip_terms(x, y, cols_x, cols_y, s, offset):
    """Per-row (i2t, t2i) cross-entropies written out: -log(exp(l_pos) / sum_j exp(l_j))."""
    terms = []
    for i in range(x.shape[0]):
        row = torch.stack([s * (x[i] * cols_y[j]).sum() for j in range(cols_y.shape[0])])
        col = torch.stack([s * (y[i] * cols_x[j]).sum() for j in range(cols_x.shape[0])])
        i2t = -(row[offset + i] - torch.log(torch.exp(row - row.max()).sum()) - row.max())
        t2i = -(col[offset + i] - torch.log(torch.exp(col - col.max()).sum()) - col.max())
        terms.append((i2t, t2i))
    return terms


def loop_clip(x, y, cols_x, cols_y, s, offset=0):
    terms = loop_clip_terms(x, y, cols_x, cols_y, s, offset)
    return sum(0.5 * (a + b) for a, b in terms) / len(terms)


def loop_siglip(x, cols_y, s, b, offset=0):
    """-(1/n) sum_i sum_j log(1 / (1 + exp(-z_ij l_ij))), one pair at a time."""
    total = 0.0
    for i in range(x.shape[0]):
        for j in range(cols_y.shape[0]):
            z = 1.0 if j == offset + i else -1.0
            logit = s * (x[i] * cols_y[j]).sum() + b
            total = total + torch.log1p(torch.exp(-z * logit))
    return total / x.shape[0]


def loop_daa_weights(cols_x, cols_y, temperature=0.05):
    """w_i = exp(u_i) / sum_k exp(u_k), u_i = (1 - cos(x_i, mean_j y_j)) / T_w, written out."""
    cols_x, cols_y = cols_x.detach(), cols_y.detach()
    n = cols_y.shape[0]
    anchor = [sum(float(cols_y[j, k]) for j in range(n)) / n for k in range(cols_y.shape[1])]
    norm_a = math.sqrt(sum(v * v for v in anchor))
    u = []
    for i in range(cols_x.shape[0]):
        xi = [float(v) for v in cols_x[i]]
        cos = sum(a * b for a, b in zip(xi, anchor)) / (math.sqrt(sum(v * v for v in xi)) * norm_a)
        u.append((1.0 - cos) / temperature)
    m = max(u)
    e = [math.exp(v - m) for v in u]
    return [v / sum(e) for v in e]


def loop_weighted_clip(x, y, cols_x, cols_y, s, weights, offset=0):
    terms = loop_clip_terms(x, y, cols_x, cols_y, s, offset)
    big_n, n = cols_x.shape[0], x.shape[0]
    return (big_n / n) * sum(float(w) * 0.5 * (a + b) for w, (a, b) in zip(weights, terms))


def graph_node_names(loss: torch.Tensor) -> set[str]:
    """Names of every autograd node behind ``loss`` (which Functions actually ran)."""
    names, stack, seen = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(f for f, _ in node.next_functions)
    return names
