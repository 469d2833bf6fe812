"""Registration nodes: register the merged model with its lineage, then apply the champion/challenger gate."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from vlalign.tracking.mlflow import register_checkpoint
from vlalign.train.checkpoint import as_checkpoint
from vlalign.tracking.registry import GateConfig, apply_gate, format_decision
from vlalign_pipelines.recipes import recipe_from, resolved_training

log = logging.getLogger(__name__)


#: The parameter groups of a default run, recorded in the lineage (the registration node reads them all).
RUN_PARAMETERS = ("validation", "model", "training", "merge", "evaluation", "registration")


def lineage_outputs(parameters: dict[str, Any]) -> dict[str, str]:
    """Checkpoint files the run wrote: each stage's ``final.pt`` (in the recipe's order) and the merged model."""
    lineage = parameters["registration"].get("lineage") or {}
    outputs = {}
    if lineage.get("stage_checkpoint"):
        for stage in resolved_training(parameters.get("training") or {}, recipe_from(None))["stages"]:
            outputs[stage["name"]] = lineage["stage_checkpoint"].format(stage=stage["name"])
    if lineage.get("merged_checkpoint"):
        outputs["merged"] = lineage["merged_checkpoint"]
    return outputs


def register_merged_model(
    checkpoint: dict[str, Any],
    manifest: pd.DataFrame,
    metrics: dict[str, Any],
    validation_report: dict[str, Any],
    **parameters: dict[str, Any],
) -> dict[str, Any]:
    """Register the merged model (an image/text embedder with a signature) with its lineage; return the version's record.

    ``parameters``: the run's parameter groups (``RUN_PARAMETERS``), recorded as the resolved parameters.
    """
    parameters = {**parameters, "training": resolved_training(parameters.get("training") or {}, recipe_from(None))}
    params = parameters["registration"]
    lineage = params.get("lineage") or {}
    return register_checkpoint(
        as_checkpoint(checkpoint), params.get("registered_model_name"), manifest, metrics, validation_report,
        params=parameters, inputs=lineage.get("inputs") or {}, outputs=lineage_outputs(parameters),
        name_template=params.get("name_template", "vlalign-{model}-{datasets}"),
        watched=tuple(lineage.get("watched", ("conf", "src"))), state_dir=lineage.get("hash_state_dir") or True,
    )


def gate_registered_model(registered_model: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Give the new version the ``challenger`` alias and ``champion`` when the gate passes; return the decision."""
    gate = GateConfig.from_dict(params["gate"], where="registration.gate")
    decision = apply_gate(registered_model["name"], registered_model["version"], gate)
    log.info("%s", format_decision(decision))
    return decision
