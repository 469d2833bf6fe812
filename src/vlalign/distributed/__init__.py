"""torch.distributed helpers: the process's context (rank, world) and collectives that keep gradients."""

from vlalign.distributed.context import DistContext, all_reduce_mean, current, init_from_env

__all__ = ["DistContext", "all_reduce_mean", "current", "init_from_env"]
