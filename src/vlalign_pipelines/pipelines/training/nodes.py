"""Training node: one stage of multi-stage training, reused per stage through Kedro namespaces."""

from __future__ import annotations

from typing import Any

import pandas as pd

from vlalign.data.formats import AUTO, resolve_langs
from vlalign.models import get_model_config
from vlalign.tracking.mlflow import StageRunLogger
from vlalign.train import CheckpointStore, StageConfig, train_stage
from vlalign.errors import ConfigError


def stage_params(training: dict[str, Any], stage_name: str) -> dict[str, Any]:
    """The parameters of the stage called ``stage_name`` in ``training.stages``."""
    for stage in training["stages"]:
        if stage["name"] == stage_name:
            return stage
    names = [s["name"] for s in training["stages"]]
    raise ConfigError(
        f"params training.stages has no stage named {stage_name!r} (it has {names}). The pipeline registry "
        "reads the stage list from conf/base and from the environment named by KEDRO_ENV: set KEDRO_ENV to "
        "the --env you run with when that environment changes the list of stages."
    )


def train_one_stage(
    manifest: pd.DataFrame,
    store: CheckpointStore,
    model: dict[str, Any],
    training: dict[str, Any],
    init_checkpoint: dict[str, Any] | None = None,
    *,
    stage_name: str,
) -> dict[str, Any]:
    """Train one stage from the previous stage's checkpoint (or from scratch) and return its final checkpoint."""
    model_cfg = get_model_config(model["name"], **model.get("overrides", {}))
    params = dict(stage_params(training, stage_name))
    params["caption_langs"] = resolve_langs(params.get("caption_langs", AUTO), manifest, "train")
    stage = StageConfig.from_dict(params)
    with StageRunLogger(stage.name, params={"model": model_cfg.to_dict(), "stage": stage.to_dict()}) as logger:
        return train_stage(model_cfg, stage, manifest, init_checkpoint, store, callbacks=[logger])
