"""The merge plot: the validation metric against beta for theta = beta*theta1 + (1-beta)*theta2, with both endpoints
(beta = 1 is theta1, beta = 0 is theta2), the chosen beta and the model soups marked.

Input shapes are those the merge pipeline writes (``merge_sweep.json``, ``soup_report.json``); a row or a soup may
carry a ``std`` (mean +- std over seeds, as ``benchmarks/compare_recipes.py`` gives), drawn as a band / error bar.
Uses matplotlib's Agg canvas directly (no pyplot, no display).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vlalign.eval.calibration import agg_figure


def merge_sweep_figure(sweep: Mapping[str, Any], soups: Sequence[Mapping[str, Any]] = (),
                       ingredients: Sequence[Mapping[str, Any]] = (), title: str = "Weight merging") -> Any:
    """A matplotlib Figure of ``sweep`` (``{"theta1", "theta2", "metric", "scores": [{"beta", "score"[, "std"]}],
    "best_beta"?}``), with each soup (``{"kind", "score"[, "std"], "ingredients": [...]}``) as a horizontal line and
    each soup ingredient's own score (``{"name", "score"}``) as a tick on the right edge."""
    rows = sorted(sweep["scores"], key=lambda r: r["beta"])
    if not rows:
        raise ValueError("merge plot: the sweep has no scores.")
    betas = [float(r["beta"]) for r in rows]
    scores = [float(r["score"]) for r in rows]
    stds = [float(r.get("std", 0.0)) for r in rows]
    fig = agg_figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    ax.plot(betas, scores, marker="o", color="tab:blue", label=f"merge: beta*{sweep['theta1']} + (1-beta)*{sweep['theta2']}")
    if any(stds):
        ax.fill_between(betas, [s - d for s, d in zip(scores, stds)], [s + d for s, d in zip(scores, stds)],
                        color="tab:blue", alpha=0.15, label="± std over seeds")
    ends = {1.0: (sweep["theta1"], "tab:green", "s"), 0.0: (sweep["theta2"], "tab:red", "D")}
    for beta, (name, colour, marker) in ends.items():
        if beta in betas:
            value = scores[betas.index(beta)]
            ax.plot([beta], [value], marker=marker, markersize=10, color=colour, linestyle="none",
                    label=f"endpoint beta={beta:g}: {name} ({value:.3f})")
    if sweep.get("best_beta") is not None and float(sweep["best_beta"]) in betas:
        best = float(sweep["best_beta"])
        ax.plot([best], [scores[betas.index(best)]], marker="*", markersize=15, color="gold", markeredgecolor="black",
                linestyle="none", label=f"chosen beta={best:g}")
    styles = {"uniform": ("tab:purple", "--"), "greedy": ("tab:orange", "-.")}
    for soup in soups:
        colour, style = styles.get(str(soup["kind"]), ("tab:gray", ":"))
        value, std = float(soup["score"]), float(soup.get("std", 0.0))
        names = ", ".join(soup.get("ingredients", []))
        ax.axhline(value, color=colour, linestyle=style, label=f"{soup['kind']} soup ({names}): {value:.3f}")
        if std:
            ax.axhspan(value - std, value + std, color=colour, alpha=0.08)
    for item in ingredients:
        ax.plot([1.04], [float(item["score"])], marker="_", markersize=14, color="gray", linestyle="none")
        ax.annotate(str(item["name"]), (1.05, float(item["score"])), fontsize="x-small", va="center")
    ax.set_xlim(-0.05, 1.2 if ingredients else 1.05)
    ax.set_xlabel(f"beta (0 = {sweep['theta2']}, 1 = {sweep['theta1']})")
    ax.set_ylabel(f"validation {sweep.get('metric', 'score')}")
    ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", loc="best")
    fig.tight_layout()
    return fig


def save_merge_sweep_plot(path: str | Path, sweep: Mapping[str, Any], soups: Sequence[Mapping[str, Any]] = (),
                          ingredients: Sequence[Mapping[str, Any]] = (), title: str = "Weight merging") -> Path:
    """Write :func:`merge_sweep_figure` as a PNG to ``path`` (its folder is created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    merge_sweep_figure(sweep, soups, ingredients, title).savefig(path, format="png", dpi=110)
    return path
