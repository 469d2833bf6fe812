"""CapFilt node: a stage's captioner and ITM head bootstrap the training corpus (BLIP)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from vlalign.data.capfilt import (
    CapFiltConfig, calibrate, capfilt_html, capfilt_report, filtered_manifest, run_capfilt,
)
from vlalign.errors import ConfigError
from vlalign.tracking.mlflow import log_metrics
from vlalign.train import model_from_checkpoint
from vlalign.train.checkpoint import as_checkpoint
from vlalign_pipelines.pipelines.training.nodes import training_rows
from vlalign_pipelines.recipes import plan, recipe_from


def capfilt_config(training: dict[str, Any]) -> CapFiltConfig:
    """The selected recipe's ``capfilt`` section as a :class:`CapFiltConfig`."""
    recipe = plan(training, recipe_from(None))
    section = recipe.sections.get("capfilt")
    if section is None:
        raise ConfigError(f"recipe {recipe.name!r} has no capfilt section (training.recipes.{recipe.name}.capfilt).")
    return CapFiltConfig.from_dict(section, f"training.recipes.{recipe.name}.capfilt")


def capfilt_corpus(checkpoint: Any, clean_manifest: pd.DataFrame, training: dict[str, Any]
                   ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any], str]:
    """Caption and filter the training rows with the stage's model, the threshold calibrated on the validation
    split's pairs (in the training rows' languages) unless the recipe fixes it: the filtered manifest (saved as a
    table and as shards for the next stage), the report (JSON) and its HTML page with examples."""
    config = capfilt_config(training)
    model = model_from_checkpoint(as_checkpoint(checkpoint))
    rows = training_rows(clean_manifest)
    validation = clean_manifest[(clean_manifest["split"] == "val") & clean_manifest["lang"].isin(set(rows["lang"]))]
    calibration = calibrate(model, model.config, validation.reset_index(drop=True), config)
    scored = run_capfilt(model, model.config, rows, config, calibration)
    kept = filtered_manifest(scored, config)
    report = capfilt_report(scored, config, calibration)
    log_metrics({"capfilt": {f"{origin}_kept_fraction": stats["kept_fraction"]
                             for origin, stats in report["per_origin"].items()}
                 | {"images_kept": report["images_kept"], "pairs_kept": report["pairs_kept"],
                    "images_rescued": report["images_rescued"], "threshold": report["threshold"]}})
    return kept, kept, report, capfilt_html(report)
