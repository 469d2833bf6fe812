"""Model soups (Wortsman et al., 2022): average the weights of several models fine-tuned from the same init.

* **Uniform soup:** the plain average of every ingredient.
* **Greedy soup:** ingredients sorted by their own validation score, best first; starting from the best one, each
  next ingredient is added (the soup is the uniform average of the ingredients kept) only if the validation score
  of the soup with it does not drop. It is never worse on validation than its best ingredient.

Pure functions over self-describing checkpoints (dicts as :func:`vlalign.train.load_checkpoint` returns); the
validation score is a callable ``score(checkpoint) -> float`` (higher is better), so they run from a notebook, the
merge pipeline or a benchmark alike. Every soup first checks that its ingredients may be merged at all
(:func:`vlalign.merge.checks.check_mergeable`: the same architecture, a shared initialisation).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vlalign.errors import ConfigError
from vlalign.merge.checks import check_mergeable
from vlalign.merge.interpolate import soup

log = logging.getLogger(__name__)

Score = Callable[[dict[str, Any]], float]


@dataclass
class SoupResult:
    """A soup, how it was made, and its validation score."""

    kind: str  # "uniform" or "greedy"
    ingredients: list[str]  # names of the checkpoints averaged into it, in the order they were added
    score: float  # validation score of the soup
    checkpoint: dict[str, Any] = field(repr=False)  # the soup as a self-describing checkpoint (no optimizer state)
    trace: list[dict[str, Any]] = field(default_factory=list)  # greedy: {name, own_score, soup_score, kept} per step

    def summary(self) -> dict[str, Any]:
        """A JSON-ready description (no weights)."""
        return {"kind": self.kind, "ingredients": list(self.ingredients), "score": self.score, "trace": self.trace}


def soup_checkpoint(ckpts: Sequence[dict[str, Any]], names: Sequence[str], kind: str = "uniform",
                    check_init: bool = True) -> dict[str, Any]:
    """A self-describing checkpoint holding the uniform average of ``ckpts``' weights (configs from the first).

    One ingredient gives a bit-exact copy of it. Refuses ingredients of different architectures or inits.
    """
    if not ckpts:
        raise ConfigError("soup: give at least one checkpoint.")
    if len(names) != len(ckpts):
        raise ConfigError(f"soup: {len(ckpts)} checkpoints but {len(names)} names; give one name per checkpoint.")
    if check_init:
        check_mergeable(ckpts, names)
    merged = copy.deepcopy({k: v for k, v in ckpts[0].items() if k not in ("model", "optimizer", "scheduler", "scaler")})
    if len(ckpts) == 1:
        merged["model"] = {k: v.detach().clone() for k, v in ckpts[0]["model"].items()}
    else:
        merged["model"] = soup([c["model"] for c in ckpts])
    merged.update(optimizer=None, scheduler=None, completed=True)
    merged["merge"] = {"soup": kind, "sources": list(names)}
    return merged


def uniform_soup(ckpts: Sequence[dict[str, Any]], names: Sequence[str], score: Score) -> SoupResult:
    """The average of every ingredient, scored on validation data."""
    candidate = soup_checkpoint(ckpts, names, "uniform")
    value = float(score(candidate))
    log.info("uniform soup of %d: score %.4f", len(ckpts), value)
    return SoupResult("uniform", list(names), value, candidate)


def greedy_soup(ckpts: Sequence[dict[str, Any]], names: Sequence[str], score: Score,
                own_scores: Sequence[float] | None = None) -> SoupResult:
    """Greedy soup: ingredients by decreasing own validation score; each is kept only if the soup's score does not
    drop. ``own_scores`` (one per ingredient) saves scoring them again when already known."""
    if len(ckpts) != len(names) or not ckpts:
        raise ConfigError(f"greedy soup: {len(ckpts)} checkpoints and {len(names)} names; give one name each (>= 1).")
    check_mergeable(ckpts, names)
    own = [float(s) for s in own_scores] if own_scores is not None else [float(score(c)) for c in ckpts]
    if len(own) != len(ckpts):
        raise ConfigError(f"greedy soup: {len(own)} own scores for {len(ckpts)} checkpoints.")
    order = sorted(range(len(ckpts)), key=lambda i: -own[i])  # stable: ties keep the given order
    kept = [order[0]]
    best = soup_checkpoint([ckpts[order[0]]], [names[order[0]]], "greedy", check_init=False)
    best_score = own[order[0]]
    trace = [{"name": names[order[0]], "own_score": own[order[0]], "soup_score": best_score, "kept": True}]
    for i in order[1:]:
        trial = kept + [i]
        candidate = soup_checkpoint([ckpts[j] for j in trial], [names[j] for j in trial], "greedy", check_init=False)
        value = float(score(candidate))
        keep = value >= best_score
        trace.append({"name": names[i], "own_score": own[i], "soup_score": value, "kept": keep})
        log.info("greedy soup + %s: %.4f (%s)", names[i], value, "kept" if keep else "dropped")
        if keep:
            kept, best, best_score = trial, candidate, value
    return SoupResult("greedy", [names[j] for j in kept], best_score, best, trace)
