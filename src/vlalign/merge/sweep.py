"""Choose the interpolation weight beta on validation data (WiSE-FT / SPHINX weight mixing)."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from vlalign.merge.checks import check_mergeable
from vlalign.merge.interpolate import interpolate_state_dicts

log = logging.getLogger(__name__)


@dataclass
class BetaSweep:
    """The outcome of a beta sweep."""

    best_beta: float  # beta with the highest validation score (the smaller beta wins a tie)
    best_score: float  # validation score at best_beta
    scores: list[dict[str, float]] = field(default_factory=list)  # [{"beta": b, "score": s}, ...] in sweep order
    metric: str = ""  # name of the validation metric that was maximised


def merged_checkpoint(ckpt1: dict[str, Any], ckpt2: dict[str, Any], beta: float, names: Sequence[str] = ("theta1", "theta2")) -> dict[str, Any]:
    """A self-describing checkpoint holding beta*theta1 + (1-beta)*theta2 (no optimizer state). Checkpoints of
    different architectures or without a shared initialisation are refused (:func:`vlalign.merge.checks.check_mergeable`)."""
    check_mergeable([ckpt1, ckpt2], list(names))
    merged = copy.deepcopy({k: v for k, v in ckpt1.items() if k not in ("model", "optimizer", "scheduler")})
    merged["model"] = interpolate_state_dicts(ckpt1["model"], ckpt2["model"], beta, names=tuple(names))
    merged["optimizer"] = None
    merged["scheduler"] = None
    merged["completed"] = True
    merged["merge"] = {"beta": float(beta), "sources": list(names)}
    return merged


def sweep_beta(
    ckpt1: dict[str, Any],
    ckpt2: dict[str, Any],
    betas: Sequence[float],
    score: Callable[[dict[str, Any]], float],
    names: Sequence[str] = ("theta1", "theta2"),
    metric: str = "score",
) -> tuple[BetaSweep, dict[str, Any]]:
    """Score every beta with ``score(merged_checkpoint)`` and return the sweep and the best merged checkpoint."""
    if not betas:
        raise ValueError("merge.betas is empty: give at least one beta in [0, 1], e.g. [0.0, 0.5, 1.0].")
    check_mergeable([ckpt1, ckpt2], list(names))  # once, before any scoring
    scores: list[dict[str, float]] = []
    best: tuple[float, float, dict[str, Any]] | None = None
    for beta in tqdm(sorted(set(float(b) for b in betas)), desc="beta sweep", unit="beta"):
        candidate = merged_checkpoint(ckpt1, ckpt2, beta, names)
        value = float(score(candidate))
        scores.append({"beta": beta, "score": value})
        log.info("beta=%.2f %s=%.4f", beta, metric, value)
        if best is None or value > best[1]:
            best = (beta, value, candidate)
    assert best is not None
    best[2]["merge"]["sweep"] = scores
    best[2]["merge"]["metric"] = metric
    return BetaSweep(best_beta=best[0], best_score=best[1], scores=scores, metric=metric), best[2]
