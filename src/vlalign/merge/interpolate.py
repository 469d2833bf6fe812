"""Weight-space merging of state dicts (WiSE-FT interpolation, uniform/weighted soups): pure functions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from vlalign.errors import ConfigError, IncompatibleCheckpointsError

StateDict = Mapping[str, torch.Tensor]


def check_compatible(sd1: StateDict, sd2: StateDict, names: tuple[str, str] = ("sd1", "sd2")) -> None:
    """Raise :class:`IncompatibleCheckpointsError` naming the first key that is missing, or whose shape or
    dtype differs. Non-float tensors (queue pointers, counters) may differ: merging copies them, never averages."""
    a, b = names
    only_1 = [k for k in sd1 if k not in sd2]
    only_2 = [k for k in sd2 if k not in sd1]
    if only_1 or only_2:
        key, owner, other = (only_1[0], a, b) if only_1 else (only_2[0], b, a)
        raise IncompatibleCheckpointsError(
            f"key {key!r} is in {owner} but not in {other} ({len(only_1)} key(s) only in {a}, {len(only_2)} only in {b}); "
            "only checkpoints of the same architecture can be merged."
        )
    for key, t1 in sd1.items():
        t2 = sd2[key]
        if t1.shape != t2.shape or t1.dtype != t2.dtype:
            raise IncompatibleCheckpointsError(
                f"key {key!r} has shape {tuple(t1.shape)} {t1.dtype} in {a} but {tuple(t2.shape)} {t2.dtype} in {b}; "
                "only checkpoints of the same architecture can be merged."
            )


def interpolate_state_dicts(
    sd1: StateDict, sd2: StateDict, beta: float, names: tuple[str, str] = ("sd1", "sd2")
) -> dict[str, torch.Tensor]:
    """theta = beta * theta1 + (1 - beta) * theta2 for every float tensor; non-float tensors (queue pointers,
    counters) are copied from sd1 unchanged, never interpolated.

    ``beta == 1`` returns copies of sd1's tensors and ``beta == 0`` of sd2's, bit for bit. ``names`` label
    the two inputs in error messages (e.g. checkpoint paths).
    """
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"beta={beta}: the interpolation weight must lie in [0, 1] (1 = {names[0]}, 0 = {names[1]}).")
    check_compatible(sd1, sd2, names)
    merged = {}
    for key, t1 in sd1.items():
        t2 = sd2[key]
        if not t1.is_floating_point() or beta == 1.0:
            merged[key] = t1.detach().clone()
        elif beta == 0.0:
            merged[key] = t2.detach().clone()
        else:
            merged[key] = torch.lerp(t2.detach(), t1.detach(), beta)  # t2 + beta * (t1 - t2)
    return merged


def soup(state_dicts: Sequence[StateDict], weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Weighted average of compatible state dicts (uniform when ``weights`` is None; weights are normalised).

    Float tensors are averaged in float64 and cast back; non-float tensors are copied from the first.
    """
    if not state_dicts:
        raise ConfigError("soup: give at least one state dict.")
    if weights is None:
        weights = [1.0] * len(state_dicts)
    if len(weights) != len(state_dicts) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(
            f"soup: weights {list(weights)} must be {len(state_dicts)} non-negative numbers with a positive sum."
        )
    total = float(sum(weights))
    for index, other in enumerate(state_dicts[1:], start=1):
        check_compatible(state_dicts[0], other, ("state_dicts[0]", f"state_dicts[{index}]"))
    merged = {}
    for key, first in state_dicts[0].items():
        if not first.is_floating_point():
            merged[key] = first.detach().clone()
            continue
        acc = torch.zeros_like(first, dtype=torch.float64)
        for weight, sd in zip(weights, state_dicts):
            acc += (weight / total) * sd[key].detach().double()
        merged[key] = acc.to(first.dtype)
    return merged
