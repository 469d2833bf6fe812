"""torch.distributed helpers: gathering features across ranks for contrastive losses."""

from vlalign.distributed.gather import gather_no_grad, gather_with_grad, rank_and_world

__all__ = ["gather_no_grad", "gather_with_grad", "rank_and_world"]
