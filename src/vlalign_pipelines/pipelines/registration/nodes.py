"""Registration nodes: register the merged model with its lineage, then apply the champion/challenger gate."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from vlalign.tracking.audit import build_evaluation_inputs
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


def stage_specs(outputs: dict[str, str], stages: list[str]) -> dict[str, dict[str, Any]]:
    """The TrainSpec each stage ran (``spec.json`` beside its ``final.pt``), in run order; stages without one (trained
    elsewhere) are left out, and an audit says so."""
    specs = {}
    for name in stages:
        spec = Path(outputs[name]).parent / "spec.json" if name in outputs else None
        if spec is not None and spec.is_file():
            specs[name] = json.loads(spec.read_text(encoding="utf-8"))
        else:
            log.warning("stage %s has no spec.json beside its final checkpoint; `vlalign audit --retrain` cannot rerun it.", name)
    return specs


def evaluation_inputs(
    manifest: pd.DataFrame, metrics: dict[str, Any], zero_shot_set: dict[str, Any], zero_shot_quarantine: pd.DataFrame,
    probe_source: dict[str, Any], evaluation: dict[str, Any],
) -> dict[str, Any]:
    """What the evaluation scored (its zero-shot images: the set minus the quarantined ones; its probe pairs), for the
    audit; registration checks its content hash against ``metrics["evaluation_data"]``."""
    from vlalign_pipelines.pipelines.evaluation.nodes import build_probe_pairs

    images = zero_shot_set["images"]
    rejected = set(zero_shot_quarantine["image_path"].dropna().astype(str)) if "image_path" in zero_shot_quarantine else set()
    keep = images["image_path"].notna() & ~images["image_path"].astype(str).isin(rejected)
    if "load_error" in images:
        keep &= images["load_error"].isna()
    pairs = build_probe_pairs(probe_source, manifest, evaluation) if "compositional" in metrics else []
    return build_evaluation_inputs(metrics, images[keep], zero_shot_set.get("classnames"), zero_shot_set.get("templates"),
                                   pairs, evaluation.get("batch_size", 256), evaluation.get("chunk_size", 1024))


def register_merged_model(
    checkpoint: dict[str, Any],
    manifest: pd.DataFrame,
    metrics: dict[str, Any],
    validation_report: dict[str, Any],
    zero_shot_set: dict[str, Any],
    zero_shot_quarantine: pd.DataFrame,
    probe_source: dict[str, Any],
    extra_inputs: dict[str, str] | None = None,
    **parameters: dict[str, Any],
) -> dict[str, Any]:
    """Register the merged model (an image/text embedder with a signature) with its lineage; return the version's record.

    ``parameters``: the run's parameter groups (``RUN_PARAMETERS``, plus ``retrain`` in the retrain pipeline),
    recorded as the resolved parameters. ``extra_inputs``: more name -> path inputs for the lineage (e.g. the
    champion checkpoint a retrain started from).
    """
    parameters = {**parameters, "training": resolved_training(parameters.get("training") or {}, recipe_from(None))}
    params = parameters["registration"]
    lineage = params.get("lineage") or {}
    outputs = lineage_outputs(parameters)
    evaluated = evaluation_inputs(manifest, metrics, zero_shot_set, zero_shot_quarantine, probe_source,
                                  parameters.get("evaluation") or {})
    return register_checkpoint(
        as_checkpoint(checkpoint), params.get("registered_model_name"), manifest, metrics, validation_report,
        params=parameters, inputs={**(lineage.get("inputs") or {}), **(extra_inputs or {})}, outputs=outputs,
        name_template=params.get("name_template", "vlalign-{model}-{datasets}"),
        watched=tuple(lineage.get("watched", ("conf", "src"))), state_dir=lineage.get("hash_state_dir") or True,
        stage_specs=stage_specs(outputs, [s["name"] for s in parameters["training"]["stages"]]),
        evaluation_inputs=evaluated,
    )


def gate_registered_model(registered_model: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Give the new version the ``challenger`` alias and ``champion`` when the gate passes; return the decision."""
    gate = GateConfig.from_dict(params["gate"], where="registration.gate")
    decision = apply_gate(registered_model["name"], registered_model["version"], gate)
    log.info("%s", format_decision(decision))
    return decision
