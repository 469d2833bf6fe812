"""Validation nodes: run the great-expectations suite, quarantine bad rows, enforce the threshold."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from vlalign.tracking.mlflow import log_metrics
from vlalign.validation.expectations import (
    ValidationConfig, enforce_threshold, summary_lines, validate_image_table, validate_manifest,
)

log = logging.getLogger(__name__)


def validate_corpus(
    raw_manifest: pd.DataFrame, params: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Split the manifest into rows that passed and quarantined rows (each with the expectations it failed);
    print and log what came in and where it went (input = clean + quarantined)."""
    config = ValidationConfig(**params["config"])
    result = validate_manifest(raw_manifest, config, data_docs_dir=Path(params["data_docs_dir"]))
    for line in summary_lines(result.report):
        log.info("%s", line)
    log_metrics(result.report["counts"], prefix="validation")
    return result.clean, result.quarantine, result.report


def validate_zero_shot_set(
    zero_shot_set: dict[str, Any], params: dict[str, Any]
) -> tuple[dict[str, Any], pd.DataFrame]:
    """The zero-shot set with only the images that pass the entry and image expectations (containment, file type,
    size, decoding), and the quarantined ones with their reasons."""
    result = validate_image_table(zero_shot_set["images"], ValidationConfig(**params["config"]))
    for line in summary_lines(result.report):
        log.info("zero-shot set %s", line)
    log_metrics(result.report["counts"], prefix="validation.zero_shot")
    return {**zero_shot_set, "images": result.clean}, result.quarantine


def gate_clean_rows(passed: pd.DataFrame, report: dict[str, Any], params: dict[str, Any]) -> pd.DataFrame:
    """Let only clean rows through, and fail the run past ``max_rejected_fraction``.

    Runs after the quarantine table is saved, so the file the error names is already on disk.
    """
    enforce_threshold(report, params["config"]["max_rejected_fraction"], params["quarantine_file"])
    return passed
