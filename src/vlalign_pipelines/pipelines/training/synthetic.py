"""The second training set of a recipe with a ``synthetic`` section (SPHINX): the training rows re-captioned by a
registered captioner (``vlalign.data.synthetic``), written as the ``synthetic_shards`` a stage names as its ``data``.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from kedro.pipeline import Pipeline, node

from vlalign.data.synthetic import CaptionerContext, SyntheticConfig, attributes_by_file, synthetic_captions
from vlalign.train.checkpoint import CheckpointRef, as_checkpoint
from vlalign_pipelines.recipes import RecipePlan, plan, recipe_from

from .nodes import training_rows

#: The catalog dataset the synthetic captions are written to (conf/base/catalog.yml).
SYNTHETIC_DATA = "synthetic_shards"


def synthetic_config(training: dict[str, Any]) -> SyntheticConfig:
    """The selected recipe's ``synthetic`` section as a :class:`SyntheticConfig`."""
    recipe = plan(training, recipe_from(None))
    return SyntheticConfig.from_dict(recipe.sections.get("synthetic"), f"training.recipes.{recipe.name}.synthetic")


def synthetic_training_rows(clean_manifest: pd.DataFrame, probe_source: dict[str, Any], training: dict[str, Any],
                            checkpoint: CheckpointRef | None = None) -> pd.DataFrame:
    """The training rows with the captions the recipe's captioner writes (ground-truth attributes from
    ``probe_source`` for the ``template`` captioner; the named stage's checkpoint for model captioners)."""
    config = synthetic_config(training)
    if checkpoint is None and config.checkpoint:  # a checkpoint file, e.g. a blip run's stage2/final.pt
        checkpoint = config.checkpoint
    context = CaptionerContext(attributes=attributes_by_file(probe_source),
                               checkpoint=as_checkpoint(checkpoint) if checkpoint is not None else None)
    return synthetic_captions(training_rows(clean_manifest), config, context)


def synthetic_data_pipeline(recipe: RecipePlan) -> Pipeline:
    """The node writing ``synthetic_shards`` when the recipe has a ``synthetic`` section (else nothing)."""
    section = recipe.sections.get("synthetic")
    if section is None:
        return Pipeline([])
    config = SyntheticConfig.from_dict(section, f"training.recipes.{recipe.name}.synthetic")
    inputs = ["clean_manifest", "probe_source", "params:training"]
    if config.checkpoint_stage:
        inputs.append(f"{config.checkpoint_stage}.final_checkpoint")
    return Pipeline([node(synthetic_training_rows, inputs=inputs, outputs=SYNTHETIC_DATA,
                          name="write_synthetic_shards")])
