"""Merge node: theta = beta*theta1 + (1-beta)*theta2, with beta chosen on the validation split."""

from __future__ import annotations

from typing import Any

import pandas as pd

from vlalign.data.formats import resolve_lang
from vlalign.eval.run import evaluate_retrieval
from vlalign.merge.sweep import sweep_beta
from vlalign.tracking.mlflow import log_metrics
from vlalign.train import model_from_checkpoint
from vlalign.train.checkpoint import CheckpointRef, as_checkpoint


def merge_stage_checkpoints(
    theta1: CheckpointRef, theta2: CheckpointRef, manifest: pd.DataFrame, params: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sweep beta on the validation split, keep the best merged checkpoint and the sweep's scores."""
    theta1, theta2 = as_checkpoint(theta1), as_checkpoint(theta2)
    metric = params["metric"]
    lang = resolve_lang(params["lang"], manifest, params["split"], "merge.lang")

    def score(candidate: dict[str, Any]) -> float:
        model = model_from_checkpoint(candidate).eval()
        result = evaluate_retrieval(model, model.config, manifest, split=params["split"], lang=lang)
        return result["metrics"][metric]

    names = (theta1["stage_config"]["name"], theta2["stage_config"]["name"])
    sweep, merged = sweep_beta(theta1, theta2, params["betas"], score, names=names, metric=metric)
    for row in sweep.scores:
        log_metrics({f"merge.val_{metric}": row["score"]}, step=int(round(row["beta"] * 100)))
    log_metrics({"merge.best_beta": sweep.best_beta, f"merge.best_val_{metric}": sweep.best_score})
    report = {"theta1": names[0], "theta2": names[1], "metric": metric, "split": params["split"], "lang": lang,
              "best_beta": sweep.best_beta, "best_score": sweep.best_score, "scores": sweep.scores}
    return merged, report
