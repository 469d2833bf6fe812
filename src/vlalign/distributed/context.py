"""Who this process is in a torch.distributed job, set up from the environment torchrun (or a pod) gives it.

One code path from laptop to cluster: a plain process is rank 0 of a world of 1; under
``torchrun --nproc-per-node N`` (or a Kubernetes pod running torchrun) the same code reads ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` and joins the process group (NCCL on GPUs,
gloo on CPU). Only rank 0 writes checkpoints, reports and MLflow.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vlalign.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job."""

    rank: int = 0  # global rank (0 writes checkpoints, reports and MLflow)
    world_size: int = 1  # number of processes
    local_rank: int = 0  # rank on this node (picks the GPU)
    backend: str | None = None  # "nccl" / "gloo" when a process group is initialised

    @property
    def is_main(self) -> bool:
        """Whether this process is rank 0."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether there is more than one process."""
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.distributed:
            dist.barrier()


def current() -> DistContext:
    """The context of an already initialised process group, or the single-process context."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                           dist.get_backend())
    return DistContext()


def init_from_env(device_type: str = "cpu") -> DistContext:
    """Join the process group described by torchrun's environment variables; a single process otherwise.

    ``device_type`` ("cpu" or "cuda") picks the backend: gloo on CPU, NCCL on CUDA.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return current()
    if not (dist.is_available() and dist.is_initialized()):
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ConfigError(f"WORLD_SIZE={world} but {missing} are not set; start the job with torchrun "
                              "(e.g. `torchrun --nproc-per-node 2 -m vlalign train --spec FILE`).")
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend, init_method="env://")
    return current()


def all_reduce_mean(values: dict[str, float], ctx: DistContext, device: torch.device) -> dict[str, float]:
    """The mean of each value over the ranks (the same dict in a single process)."""
    if not ctx.distributed or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)  # (K,)
    dist.all_reduce(tensor)
    return {k: float(v) / ctx.world_size for k, v in zip(keys, tensor.tolist())}
