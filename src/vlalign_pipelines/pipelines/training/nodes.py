"""Training nodes: the training rows as shards, then one stage per namespace, each a call of `vlalign train`."""

from __future__ import annotations

from typing import Any

import pandas as pd

from vlalign import reproducibility
from vlalign.data.formats import AUTO
from vlalign.errors import ConfigError
from vlalign.models import get_model_config
from vlalign.tracking.mlflow import tracking_context
from vlalign.train import StageConfig
from vlalign.train.checkpoint import CheckpointRef
from vlalign.train.run import run_stage, run_stage_in_subprocess
from vlalign.train.spec import TrainSpec
from vlalign_pipelines.recipes import recipe_from, resolve_model, stage_params


def training_rows(clean_manifest: pd.DataFrame) -> pd.DataFrame:
    """The clean manifest's ``train`` split: what the shards hold and every stage trains on."""
    rows = clean_manifest[clean_manifest["split"] == "train"]
    if rows.empty:
        raise ConfigError(f"the clean manifest has no split == 'train' rows (splits: {sorted(clean_manifest['split'].unique())}); "
                          "check the corpus's split fields and the quarantine file.")
    return rows.reset_index(drop=True)


def stage_spec(shards: Any, stage_dir: str, model: dict[str, Any], training: dict[str, Any], stage_name: str,
               init: CheckpointRef | None) -> TrainSpec:
    """The TrainSpec of one stage: resolved configs (``caption_langs: auto`` = the shards' languages), the shard
    index, the stage folder, the previous stage's final.pt, and the active MLflow run as parent."""
    model = resolve_model(model, training, recipe_from(None))
    model_cfg = get_model_config(model["name"], **model.get("overrides", {}))
    params = dict(stage_params(training, stage_name, recipe_from(None)))
    if params.get("caption_langs", AUTO) == AUTO:
        params["caption_langs"] = list(shards.langs)
    stage = StageConfig.from_dict(params)
    return TrainSpec(model=model_cfg.to_dict(), stage=stage.to_dict(), data=shards.location, out_dir=stage_dir,
                     init=init.path if init is not None else None, mlflow=tracking_context())


def mix_training_data(*sources: Any, weights: list[int]) -> list[tuple[Any, int]]:
    """The shard sets a stage lists as its ``data``, with their weights; the catalog dataset
    ``<stage>.mixed_shards`` writes them as one shard set (:func:`vlalign.data.shards.mix_shards`)."""
    return list(zip(sources, weights))


def train_one_stage(
    train_data: Any,
    stage_dir: str,
    model: dict[str, Any],
    training: dict[str, Any],
    kubernetes: dict[str, Any],
    init_checkpoint: CheckpointRef | None = None,
    *,
    stage_name: str,
) -> CheckpointRef:
    """Run one stage (here, or as a Kubernetes job when its ``compute`` is ``kubernetes``); hand on its final.pt."""
    spec = stage_spec(train_data, stage_dir, model, training, stage_name, init_checkpoint)
    if spec.stage["compute"] == "kubernetes":
        from vlalign.launch.k8s import KubernetesConfig, run_stage_on_kubernetes

        return CheckpointRef(str(run_stage_on_kubernetes(spec, KubernetesConfig.from_dict(kubernetes))))
    if not reproducibility.in_force(spec.stage["reproducibility"], spec.stage["cpu_threads"]):
        return CheckpointRef(str(run_stage_in_subprocess(spec)))
    return CheckpointRef(str(run_stage(spec)))
