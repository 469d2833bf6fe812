"""Evaluation node: retrieval (multi-caption protocol) and zero-shot classification, beside chance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from vlalign.eval.run import evaluate_retrieval, evaluate_zero_shot
from vlalign.eval.report import write_benchmark_report
from vlalign.tracking.mlflow import log_artifact, log_metrics
from vlalign.train import model_from_checkpoint


SUMMARY_KEYS = ("dataset", "split", "language", "n_images", "n_captions", "n_classes", "n_templates",
                "metrics", "chance", "ratio_to_chance")


def evaluate_model(
    checkpoint: dict[str, Any], manifest: pd.DataFrame, zero_shot_set: dict[str, Any], params: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return metrics.json (every metric beside its chance level and ratio to chance) and the details
    behind the report (recall@K curves, per-class accuracy, reliability-diagram data)."""
    model = model_from_checkpoint(checkpoint).eval()
    retrieval = evaluate_retrieval(model, model.config, manifest, split=params["split"], lang=params["lang"],
                                   batch_size=params["batch_size"], chunk_size=params["chunk_size"])
    lang = params["zero_shot_lang"]
    zero_shot = evaluate_zero_shot(model, model.config, zero_shot_set["images"], zero_shot_set["classnames"][lang],
                                   zero_shot_set["templates"][lang], lang=lang, batch_size=params["batch_size"])
    retrieval["dataset"], zero_shot["dataset"] = params["retrieval_dataset"], params["zero_shot_dataset"]
    for block in (retrieval, zero_shot):
        block["ratio_to_chance"] = {k: v / block["chance"][k] for k, v in block["metrics"].items()
                                    if block["chance"].get(k)}
    metrics = {
        "model": {"merge_beta": (checkpoint.get("merge") or {}).get("beta"), "stage": checkpoint["stage_config"]["name"]},
        "retrieval": {k: retrieval[k] for k in SUMMARY_KEYS if k in retrieval},
        "zero_shot": {k: zero_shot[k] for k in SUMMARY_KEYS if k in zero_shot},
    }
    log_metrics({"test": retrieval["metrics"], "zero_shot": zero_shot["metrics"]})
    return metrics, {"retrieval": retrieval, "zero_shot": zero_shot}


def write_report(details: dict[str, Any], params: dict[str, Any]) -> dict[str, str]:
    """Markdown + HTML benchmark report with recall@K curves, reliability diagram and per-class accuracy."""
    retrieval, zero_shot = details["retrieval"], details["zero_shot"]
    chance = dict(retrieval["chance"])  # chance at every K of the curve, drawn as dashed lines
    for direction, values in retrieval["curve_chance"].items():
        chance.update({f"{direction}@{k}": v for k, v in zip(retrieval["curve"]["k"], values)})
    sections = {
        f"{retrieval['dataset']} retrieval ({retrieval['language']}, {retrieval['split']})": {
            **{k: v for k, v in retrieval.items() if k not in ("curve_chance", "ratio_to_chance")},
            "chance": chance,
            "description": "Multi-caption protocol: an image counts as retrieved when any of its captions is "
            "in the top K; each caption has exactly one correct image. Ties count against the model.",
        },
        f"{zero_shot['dataset']} zero-shot ({zero_shot['language']})": {
            **{k: v for k, v in zero_shot.items() if k != "ratio_to_chance"},
            "description": f"Prompt-template ensembling over {zero_shot['n_templates']} templates.",
        },
    }
    out_dir = Path(params["report_dir"])
    paths = write_benchmark_report(sections, out_dir, title=params.get("report_title", "vlalign benchmark report"))
    log_artifact(out_dir, "report")
    return {name: str(path) for name, path in paths.items()}
