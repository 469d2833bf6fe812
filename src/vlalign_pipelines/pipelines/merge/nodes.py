"""Merge nodes: theta = beta*theta1 + (1-beta)*theta2 with beta chosen on the validation split; model soups over a
recipe's fine-tuned stages; the plot of the metric against beta with the endpoints and soups marked."""

from __future__ import annotations

from typing import Any, Callable

import pandas as pd

from vlalign.data.formats import resolve_lang
from vlalign.eval.merge_plot import merge_sweep_figure
from vlalign.eval.run import evaluate_retrieval
from vlalign.merge.soups import greedy_soup, uniform_soup
from vlalign.merge.sweep import sweep_beta
from vlalign.tracking.mlflow import log_metrics
from vlalign.train import model_from_checkpoint
from vlalign.train.checkpoint import CheckpointRef, as_checkpoint
from vlalign_pipelines.recipes import plan, recipe_from


def validation_score(manifest: pd.DataFrame, params: dict[str, Any]) -> tuple[Callable[[dict[str, Any]], float], str]:
    """``score(checkpoint)``: the ``merge.metric`` of retrieval on ``merge.split`` (and the language it uses)."""
    lang = resolve_lang(params["lang"], manifest, params["split"], "merge.lang")

    def score(candidate: dict[str, Any]) -> float:
        model = model_from_checkpoint(candidate).eval()
        result = evaluate_retrieval(model, model.config, manifest, split=params["split"], lang=lang)
        return result["metrics"][params["metric"]]

    return score, lang


def merge_stage_checkpoints(
    theta1: CheckpointRef, theta2: CheckpointRef, manifest: pd.DataFrame, params: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sweep beta on the validation split, keep the best merged checkpoint and the sweep's scores."""
    theta1, theta2 = as_checkpoint(theta1), as_checkpoint(theta2)
    metric = params["metric"]
    score, lang = validation_score(manifest, params)
    names = (theta1["stage_config"]["name"], theta2["stage_config"]["name"])
    sweep, merged = sweep_beta(theta1, theta2, params["betas"], score, names=names, metric=metric)
    for row in sweep.scores:
        log_metrics({f"merge.val_{metric}": row["score"]}, step=int(round(row["beta"] * 100)))
    log_metrics({"merge.best_beta": sweep.best_beta, f"merge.best_val_{metric}": sweep.best_score})
    report = {"theta1": names[0], "theta2": names[1], "metric": metric, "split": params["split"], "lang": lang,
              "best_beta": sweep.best_beta, "best_score": sweep.best_score, "scores": sweep.scores}
    return merged, report


def soup_stages(training: dict[str, Any]) -> list[str]:
    """The stages the selected recipe's ``soup`` section names (its ``stages``)."""
    recipe = plan(training, recipe_from(None))
    return list((recipe.sections.get("soup") or {}).get("stages") or [])


def make_soups(manifest: pd.DataFrame, params: dict[str, Any], training: dict[str, Any],
               *ingredients: CheckpointRef) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Uniform and greedy soups of the recipe's ``soup.stages`` (fine-tunes sharing an init), scored on the
    validation split; returns both soups and the report (every ingredient's own score, the greedy trace)."""
    ckpts = [as_checkpoint(c) for c in ingredients]
    names = [c["stage_config"]["name"] for c in ckpts]
    score, lang = validation_score(manifest, params)
    own = [float(score(c)) for c in ckpts]
    uniform = uniform_soup(ckpts, names, score)
    greedy = greedy_soup(ckpts, names, score, own_scores=own)
    metric = params["metric"]
    log_metrics({f"soup.uniform_val_{metric}": uniform.score, f"soup.greedy_val_{metric}": greedy.score})
    report = {"metric": metric, "split": params["split"], "lang": lang,
              "ingredients": [{"name": n, "score": s} for n, s in zip(names, own)],
              "soups": [uniform.summary(), greedy.summary()]}
    return uniform.checkpoint, greedy.checkpoint, report


def merge_plot(merge_sweep: dict[str, Any], soup_report: dict[str, Any]) -> Any:
    """The validation metric against beta, both endpoints, the chosen beta, the soups and their ingredients."""
    return merge_sweep_figure(merge_sweep, soup_report.get("soups", []), soup_report.get("ingredients", []),
                              title=f"beta sweep and soups ({merge_sweep['split']} split, {merge_sweep['lang']})")
