"""Evaluation node: retrieval (multi-caption protocol) and zero-shot classification, beside chance."""

from __future__ import annotations

from typing import Any

import pandas as pd

from vlalign.eval.run import evaluate_retrieval, evaluate_zero_shot
from vlalign.tracking.mlflow import log_metrics
from vlalign.train import model_from_checkpoint


def evaluate_model(
    checkpoint: dict[str, Any], manifest: pd.DataFrame, zero_shot_set: dict[str, Any], params: dict[str, Any]
) -> dict[str, Any]:
    """metrics.json: every metric with its chance level and its ratio to chance."""
    model = model_from_checkpoint(checkpoint).eval()
    retrieval = evaluate_retrieval(model, model.config, manifest, split=params["split"], lang=params["lang"],
                                   batch_size=params["batch_size"], chunk_size=params["chunk_size"])
    lang = params["zero_shot_lang"]
    zero_shot = evaluate_zero_shot(model, model.config, zero_shot_set["images"], zero_shot_set["classnames"][lang],
                                   zero_shot_set["templates"][lang], lang=lang, batch_size=params["batch_size"])
    for block in (retrieval, zero_shot):
        block["ratio_to_chance"] = {k: v / block["chance"][k] for k, v in block["metrics"].items()
                                    if block["chance"].get(k)}
    metrics = {
        "model": {"merge_beta": (checkpoint.get("merge") or {}).get("beta"), "stage": checkpoint["stage_config"]["name"]},
        "retrieval": {"dataset": params["retrieval_dataset"], **retrieval},
        "zero_shot": {"dataset": params["zero_shot_dataset"], **zero_shot},
    }
    log_metrics({"test": retrieval["metrics"], "zero_shot": zero_shot["metrics"]})
    return metrics
