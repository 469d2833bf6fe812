"""Registration node: log the merged model with its lineage and register a new model version."""

from __future__ import annotations

from typing import Any

import pandas as pd

from vlalign.tracking.mlflow import register_checkpoint
from vlalign.train.checkpoint import as_checkpoint


def register_merged_model(
    checkpoint: dict[str, Any],
    manifest: pd.DataFrame,
    metrics: dict[str, Any],
    validation_report: dict[str, Any],
    params: dict[str, Any],
) -> dict[str, Any]:
    """Register the merged model (an image/text embedder with a signature); return the version's record."""
    return register_checkpoint(as_checkpoint(checkpoint), params["registered_model_name"], manifest, metrics,
                               validation_report)
