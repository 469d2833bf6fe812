"""Nodes that resolve the model to evaluate and the evaluation parameters of the evaluate pipeline."""

from __future__ import annotations

from typing import Any

from vlalign.errors import ConfigError
from vlalign.tracking.mlflow import load_checkpoint_from_uri


def load_model_from_uri(model_uri: str | None) -> dict[str, Any]:
    """The checkpoint behind ``model_uri`` (models:/name/version, runs:/..., or a checkpoint path)."""
    if not model_uri:
        raise ConfigError(
            "the evaluate pipeline needs a model: run `kedro run --pipeline evaluate --params "
            "model_uri=models:/vlalign-clip/<version>` (or model_uri=data/06_models/merged/merged.pt, or any "
            "checkpoint path); parameter `model_uri` is null."
        )
    return load_checkpoint_from_uri(str(model_uri))


def evaluate_params(evaluation: dict[str, Any], overrides: dict[str, Any], model_uri: str | None) -> dict[str, Any]:
    """The default pipeline's ``evaluation`` parameters with the ``evaluate`` overrides (report folder, title)."""
    return {**evaluation, **(overrides or {}), "model_uri": str(model_uri)}
