"""Triton kernels for the contrastive losses (flash-attention style online LSE, backward by recomputation).

``import vlalign.losses.triton`` works without triton installed; :data:`HAS_TRITON` says whether the kernels
can be used, and the wrappers raise a clear error when they cannot. On a CPU the kernels run only under the
Triton interpreter, which needs ``TRITON_INTERPRET=1`` in the environment *before* triton is imported.
"""

from __future__ import annotations

import importlib.util
import os



def _has_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as absent
        return False


HAS_TRITON = _has_triton()


def interpreting() -> bool:
    """True when the Triton interpreter is on (``TRITON_INTERPRET=1``): kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


from vlalign.losses.triton.ops import (  # noqa: E402  (after HAS_TRITON, which ops reads)
    TRITON_OPS,
    triton_clip_loss_local,
    triton_siglip_loss_local,
    triton_weighted_clip_loss_local,
    triton_unavailable_reason,
)

__all__ = [
    "HAS_TRITON",
    "TRITON_OPS",
    "interpreting",
    "triton_clip_loss_local",
    "triton_siglip_loss_local",
    "triton_unavailable_reason",
    "triton_weighted_clip_loss_local",
]
