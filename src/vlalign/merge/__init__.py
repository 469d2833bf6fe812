"""Weight-space merging: pure functions from state dicts / checkpoints to a state dict / checkpoint (INTERFACES §8)."""

from vlalign.errors import IncompatibleCheckpointsError
from vlalign.merge.checks import check_mergeable
from vlalign.merge.interpolate import check_compatible, interpolate_state_dicts, soup
from vlalign.merge.soups import SoupResult, greedy_soup, soup_checkpoint, uniform_soup

__all__ = ["IncompatibleCheckpointsError", "SoupResult", "check_compatible", "check_mergeable", "greedy_soup",
           "interpolate_state_dicts", "soup", "soup_checkpoint", "uniform_soup"]
