"""Local losses over gathered features on 2 gloo ranks equal the single-process loss; a plain all_gather does not.

One spawn of 2 processes (about 10 s). Each rank holds 5 of the 10 samples, gathers all of them, computes its
local loss with every implementation that runs on CPU, backpropagates, and writes its loss and gradients to a
file. The checks, in the parent: the mean of the rank losses is the global loss, and each rank's feature gradient
divided by the world size (what DDP's gradient averaging applies to the parameters) is the slice of the global
gradient; the logit-scale and bias gradients averaged over ranks are the global ones. A deliberately wrong gather
(plain ``all_gather`` without gradient, own slice re-inserted, as open_clip does without ``--gather-with-grad``)
must give a different gradient, which shows that the test can fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vlalign.distributed import gather_no_grad, gather_with_grad
from vlalign.losses import select
from vlalign.losses.functional import daa_weights

WORLD, N, D, TILE = 2, 10, 6, 3  # the tile (3) straddles the rank boundary (5)
KINDS = ("clip", "siglip", "weighted_clip")
IMPLS = ("naive", "tiled")


def _global_problem() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(N, D, generator=gen, dtype=torch.float64), dim=-1)  # (N, D)
    text = F.normalize(image + torch.randn(N, D, generator=gen, dtype=torch.float64), dim=-1)  # (N, D)
    return {"image": image, "text": text, "scale": torch.tensor(9.0, dtype=torch.float64),
            "bias": torch.tensor(-3.0, dtype=torch.float64)}


def _loss(kind: str, impl: str, x, y, image_cols, text_cols, scale, bias, offset: int) -> torch.Tensor:
    fn = select.loss_function(kind, impl)
    extra = {} if impl == "naive" else {"tile": TILE}
    if kind == "clip":
        return fn(x, y, image_cols, text_cols, scale, row_offset=offset, **extra)
    if kind == "siglip":
        return fn(x, text_cols, scale, bias, row_offset=offset, **extra)
    weights = daa_weights(gather_no_grad(x), gather_no_grad(y))[offset : offset + x.shape[0]]  # (n,) global weights
    return fn(x, y, image_cols, text_cols, scale, weights, row_offset=offset, **extra)


def _plain_gather(x: torch.Tensor) -> torch.Tensor:
    """The pitfall: all_gather carries no gradient; only this rank's own slice is re-inserted with gradient."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach())
    parts[dist.get_rank()] = x
    return torch.cat(parts)  # (w * n, D)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        g = _global_problem()
        n = N // WORLD
        rows = slice(rank * n, (rank + 1) * n)
        results = {}
        for name, gather in (("with_grad", gather_with_grad), ("plain", _plain_gather)):
            for kind in KINDS:
                for impl in IMPLS:
                    if name == "plain" and impl == "naive":
                        continue
                    x = g["image"][rows].clone().requires_grad_()  # (n, D) this rank's samples
                    y = g["text"][rows].clone().requires_grad_()
                    scale = g["scale"].clone().requires_grad_()
                    bias = g["bias"].clone().requires_grad_()
                    image_cols, text_cols = gather(x), gather(y)  # (N, D)
                    loss = _loss(kind, impl, x, y, image_cols, text_cols, scale, bias, rank * n)
                    loss.backward()
                    results[f"{name}/{kind}/{impl}"] = {
                        "loss": loss.detach(),
                        "image": x.grad,
                        "text": y.grad,
                        "scale": scale.grad,
                        "bias": bias.grad if bias.grad is not None else torch.zeros((), dtype=torch.float64),
                    }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _single_process(kind: str) -> dict[str, torch.Tensor]:
    g = _global_problem()
    x, y = g["image"].clone().requires_grad_(), g["text"].clone().requires_grad_()
    scale, bias = g["scale"].clone().requires_grad_(), g["bias"].clone().requires_grad_()
    loss = _loss(kind, "naive", x, y, x, y, scale, bias, 0)
    loss.backward()
    return {"loss": loss.detach(), "image": x.grad, "text": y.grad, "scale": scale.grad,
            "bias": bias.grad if bias.grad is not None else torch.zeros((), dtype=torch.float64)}


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("gather")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _combine(ranks: list[dict], key: str) -> dict[str, torch.Tensor]:
    """What DDP yields: mean loss, per-rank feature gradients / world (stacked), mean scalar gradients."""
    parts = [r[key] for r in ranks]
    return {
        "loss": sum(p["loss"] for p in parts) / WORLD,
        "image": torch.cat([p["image"] for p in parts]) / WORLD,
        "text": torch.cat([p["text"] for p in parts]) / WORLD,
        "scale": sum(p["scale"] for p in parts) / WORLD,
        "bias": sum(p["bias"] for p in parts) / WORLD,
    }


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in ("loss", "image", "text", "scale", "bias"))


@pytest.mark.distributed
def test_local_loss_over_gathered_features_equals_the_single_process_loss(rank_results: list[dict]) -> None:
    for kind in KINDS:
        want = _single_process(kind)
        for impl in IMPLS:
            got = _combine(rank_results, f"with_grad/{kind}/{impl}")
            assert _max_diff(got, want) < 1e-12, (kind, impl, _max_diff(got, want))


@pytest.mark.distributed
def test_a_plain_all_gather_gives_a_different_gradient(rank_results: list[dict]) -> None:
    for kind in KINDS:
        want = _single_process(kind)
        wrong = _combine(rank_results, f"plain/{kind}/tiled")
        assert abs(float(wrong["loss"] - want["loss"])) < 1e-12  # the forward value is right ...
        grad_gap = max(float((wrong[k] - want[k]).abs().max()) for k in ("image", "text"))
        assert grad_gap > 1e-3, (kind, grad_gap)  # ... the feature gradient is not


def test_gather_is_the_identity_without_a_process_group() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x
    assert torch.equal(gather_no_grad(x), x) and not gather_no_grad(x).requires_grad
