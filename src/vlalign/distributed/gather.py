"""All-gather of per-rank features for the local-form contrastive losses.

Each rank holds ``x`` (n, D), its own samples; the loss needs the (w * n, D) global batch with the gradient of
the other ranks' losses flowing back to this rank's ``x``. :func:`gather_with_grad` does that with the
functional collectives: its backward is a reduce-scatter (sum) of the gathered gradient, so rank r receives
sum_k dL_k/dx_r. DDP then averages parameter gradients over ranks, which yields the gradient of the mean of the
per-rank losses, i.e. of the global loss (the local losses in :mod:`vlalign.losses` are normalised per local row
for exactly this reason).

The pitfall this module exists for (measured, see DESIGN.md): a plain ``torch.distributed.all_gather`` carries
no gradient. With the global loss that gives exactly half the gradient on 2 ranks; with the local loss (even
with the own slice re-inserted, open_clip style without ``--gather-with-grad``) it drops every cross-rank
term. ``torch.distributed.nn.all_gather`` is deprecated. ``all_gather_tensor_autograd`` is deprecated in torch
2.14 in favour of ``all_gather_single_autograd`` (the same op), which is used here when present.

All ranks must pass the same number of rows n (a loader that drops the last incomplete batch); the rows of rank r
are then at ``row_offset = r * n`` of the gathered tensor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["gather_no_grad", "gather_with_grad", "is_distributed", "rank_and_world"]


def is_distributed() -> bool:
    """True when torch.distributed is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default group, ``(0, 1)`` when not distributed."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _all_gather_autograd(x: torch.Tensor) -> torch.Tensor:
    from torch.distributed import _functional_collectives as funcol

    gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
    gathered = gather(x.contiguous(), 0, dist.group.WORLD)  # (w * n, D), possibly an AsyncCollectiveTensor
    return funcol.wait_tensor(gathered) if isinstance(gathered, funcol.AsyncCollectiveTensor) else gathered


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' ``x`` (n, ...) concatenated along dim 0 -> (w * n, ...), gradient flowing back to each rank's x.

    The identity (``x`` itself) when torch.distributed is not initialised, so single-process code is unchanged
    and the losses can recognise the global form (rows *is* cols).
    """
    if not is_distributed():
        return x
    return _all_gather_autograd(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' ``x`` concatenated along dim 0, detached (for weights, metrics, anchors). ``x`` when not distributed."""
    if not is_distributed():
        return x.detach()
    world = dist.get_world_size()
    out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)  # (w * n, ...)
    # torch 2.14 renamed all_gather_into_tensor to all_gather_single (the old name warns as deprecated).
    gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather_single(out, x.detach().contiguous())
    return out
