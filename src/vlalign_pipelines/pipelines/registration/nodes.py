"""Registration node: log the merged model with its lineage and register a new model version."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from vlalign.tracking.lineage import build_lineage, lineage_tags
from vlalign.tracking.mlflow import active_run_id, png_bytes, register_model, temporary_checkpoint_file


def register_merged_model(
    checkpoint: dict[str, Any],
    manifest: pd.DataFrame,
    metrics: dict[str, Any],
    validation_report: dict[str, Any],
    params: dict[str, Any],
) -> dict[str, Any]:
    """Register the merged model (an image/text embedder with a signature); return the version's record."""
    path = temporary_checkpoint_file(checkpoint)
    lineage = build_lineage(path, manifest, {"merge": checkpoint.get("merge"), "model": checkpoint["model_config"]},
                            metrics, validation_report, run_id=active_run_id())
    lineage_file = Path(tempfile.mkdtemp(prefix="vlalign-lineage-")) / "lineage.json"
    lineage_file.write_text(json.dumps(lineage, indent=2, default=str))
    example = png_bytes(manifest["image_path"].iloc[0])
    record = register_model(path, params["registered_model_name"], example, tags=lineage_tags(lineage),
                            extra_artifacts={"lineage": lineage_file})
    return {**record, "lineage": lineage}
