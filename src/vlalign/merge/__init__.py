"""Weight-space merging: pure functions from state dicts to a state dict (see INTERFACES §8)."""

from vlalign.errors import IncompatibleCheckpointsError
from vlalign.merge.interpolate import check_compatible, interpolate_state_dicts, soup

__all__ = ["IncompatibleCheckpointsError", "check_compatible", "interpolate_state_dicts", "soup"]
