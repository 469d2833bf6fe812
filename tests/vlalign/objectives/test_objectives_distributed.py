"""The ``siglip`` and ``daa`` objectives on 2 gloo ranks equal one process on the global batch (fp64).

One spawn of 2 processes (about 10 s). Each rank holds 4 of the 8 samples and calls the registered objective with its
DistContext; the parent checks what DDP would make of it: the mean of the rank losses is the global loss, each rank's
feature gradient divided by the world size is its slice of the global gradient, the scale and bias gradients averaged
over ranks are the global ones, and DAA's weights (anchor and softmax) are those of the global batch on both ranks.
Without gradient through the gather (``gather_with_grad: false``) the gradient differs, which shows the test can fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vlalign.distributed.context import DistContext
from vlalign.objectives import ObjectiveContext, build_objective

pytestmark = pytest.mark.distributed
WORLD, N, D = 2, 8, 6
CASES = {
    "siglip": ("siglip", {}),
    "siglip_tiled": ("siglip", {"loss_impl": "tiled", "tile": 3}),
    "daa": ("daa", {"temperature": 0.05}),
    "daa_tiled": ("daa", {"temperature": 0.05, "loss_impl": "tiled", "tile": 3}),
    "siglip_no_grad_gather": ("siglip", {"gather_with_grad": False}),
    "daa_no_grad_gather": ("daa", {"gather_with_grad": False}),
}


def _problem() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(N, D, generator=gen, dtype=torch.float64), dim=-1)  # (N, D)
    text = F.normalize(image + torch.randn(N, D, generator=gen, dtype=torch.float64), dim=-1)  # (N, D)
    return {"image_features": image, "text_features": text, "logit_scale": torch.tensor(8.0, dtype=torch.float64),
            "logit_bias": torch.tensor(-3.0, dtype=torch.float64)}


def _run(name: str, ctx: DistContext, rows: slice) -> dict[str, torch.Tensor]:
    kind, options = CASES[name]
    leaves = {k: (v[rows] if v.ndim else v).clone().requires_grad_() for k, v in _problem().items()}
    terms = build_objective(kind, options, ObjectiveContext(dist=ctx))(leaves, {})
    terms["loss"].backward()
    result = {k: leaves[k].grad for k in leaves}
    result.update({k: v.detach() for k, v in terms.items()})
    return result


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        n = N // WORLD
        ctx = DistContext(rank, WORLD, rank, "gloo")
        results = {name: _run(name, ctx, slice(rank * n, (rank + 1) * n)) for name in CASES}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for name, (kind, _) in CASES.items():
        want = _run(name.replace("_no_grad_gather", ""), DistContext(), slice(None))
        parts = [r[name] for r in ranks]
        got = {
            "loss": sum(p["loss"] for p in parts) / WORLD,
            "image_features": torch.cat([p["image_features"] for p in parts]) / WORLD,
            "text_features": torch.cat([p["text_features"] for p in parts]) / WORLD,
            "logit_scale": sum(p["logit_scale"] for p in parts) / WORLD,
        }
        assert abs(float(got["loss"] - want["loss"])) < 1e-12, name  # the forward value is always right
        gap = max(float((got[k] - want[k]).abs().max()) for k in ("image_features", "text_features", "logit_scale"))
        if name.endswith("no_grad_gather"):
            assert gap > 1e-3, (name, gap)  # the known pitfall: cross-rank terms lose their gradient
            continue
        assert gap < 1e-12, (name, gap)
        if kind == "siglip":  # the bias gets a gradient only from the rows' own logits: averaged over ranks
            assert abs(float(sum(p["logit_bias"] for p in parts) / WORLD - want["logit_bias"])) < 1e-12
        else:  # the anchor and the weights are the global batch's on every rank
            for part in parts:
                assert float(part["daa_effective_batch"]) == pytest.approx(float(want["daa_effective_batch"]), rel=1e-6)
                assert float(part["daa_max_weight"]) == pytest.approx(float(want["daa_max_weight"]), rel=1e-6)
