"""torch.distributed helpers: the process's context (rank, world) and collectives that keep gradients."""

from vlalign.distributed.context import DistContext, all_reduce_mean, current, init_from_env
from vlalign.distributed.gather import gather_no_grad, gather_with_grad, rank_and_world

__all__ = ["DistContext", "all_reduce_mean", "current", "gather_no_grad", "gather_with_grad", "init_from_env",
           "rank_and_world"]
