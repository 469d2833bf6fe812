"""Validation nodes: run the great-expectations suite, quarantine bad rows, enforce the threshold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from vlalign.validation.expectations import ValidationConfig, enforce_threshold, validate_manifest


def validate_corpus(
    raw_manifest: pd.DataFrame, params: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Split the manifest into rows that passed and quarantined rows (each with the expectations it failed)."""
    config = ValidationConfig(**params["config"])
    result = validate_manifest(raw_manifest, config, data_docs_dir=Path(params["data_docs_dir"]))
    return result.clean, result.quarantine, result.report


def gate_clean_rows(passed: pd.DataFrame, report: dict[str, Any], params: dict[str, Any]) -> pd.DataFrame:
    """Let only clean rows through, and fail the run past ``max_rejected_fraction``.

    Runs after the quarantine table is saved, so the file the error names is already on disk.
    """
    enforce_threshold(report, params["config"]["max_rejected_fraction"], params["quarantine_file"])
    return passed
