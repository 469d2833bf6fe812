"""Training pipeline: the training rows as tar shards, then one stage's node per stage under its namespace.

Stage N reads ``stage{N-1}.final_checkpoint``; each stage writes its spec, resumable checkpoints and final.pt in
``<stage>.stage_dir`` (see the dataset factories in conf/base/catalog.yml).
"""

from __future__ import annotations

import os
from functools import partial, update_wrapper
from pathlib import Path

from kedro.pipeline import Pipeline, node, pipeline

from vlalign.errors import ConfigError
from vlalign_pipelines.settings import CONFIG_LOADER_ARGS, DEFAULT_ENV, RunConfigLoader

from vlalign_pipelines.recipes import StagePlan, project_plan

from .nodes import mix_training_data, train_one_stage, training_rows


def stage_names(conf_source: str | Path = "conf", env: str | None = None) -> list[str]:
    """Stage names of the selected recipe, in order (see :mod:`vlalign_pipelines.recipes`)."""
    return [stage.name for stage in project_plan(conf_source, env).stages]


def stage_pipeline(stage: StagePlan) -> Pipeline:
    """The training node of one stage, namespaced: it trains on ``stage.data`` and starts from ``stage.init``'s
    final checkpoint (none: fresh weights)."""
    inputs = ["train_data", "stage_dir", "params:model", "params:training", "params:kubernetes"]
    mapping = {"train_data": stage.data}
    nodes = []
    if stage.mixture:  # several shard datasets, mixed with their weights into <stage>.mixed_shards
        names = [name for name, _ in stage.mixture]
        mapping = {f"mix_source_{k}": name for k, name in enumerate(names)}
        mix = update_wrapper(partial(mix_training_data, weights=[w for _, w in stage.mixture]), mix_training_data)
        nodes.append(node(mix, inputs=list(mapping), outputs="mixed_shards", name="mix_training_data"))
        inputs[0] = "mixed_shards"
    if stage.init is not None:
        inputs.append("init_checkpoint")
        mapping["init_checkpoint"] = f"{stage.init}.final_checkpoint"
    func = update_wrapper(partial(train_one_stage, stage_name=stage.name), train_one_stage)
    base = pipeline([*nodes, node(func, inputs=inputs, outputs="final_checkpoint", name="train")])
    return pipeline(base, namespace=stage.name, inputs=mapping,
                    parameters={"params:model", "params:training", "params:kubernetes"})


def create_pipeline(**kwargs) -> Pipeline:
    """The shard step, then every stage of the recipe (``stages=[...]`` builds a plain chain, for tests)."""
    recipe = None
    if kwargs.get("stages"):
        names = list(kwargs["stages"])
        stages = [StagePlan(n, init=names[k - 1] if k else None) for k, n in enumerate(names)]
        capfilt = Pipeline([])
    else:
        from ..capfilt.pipeline import for_plan as capfilt_for_plan  # late: the capfilt node reuses training's nodes

        recipe = project_plan()
        stages = recipe.stages
        capfilt = capfilt_for_plan(recipe)  # e.g. blip: caption + filter after a stage; a later stage trains on it
    result = Pipeline([node(training_rows, inputs="clean_manifest", outputs="train_shards", name="write_training_shards")])
    if recipe is not None:  # more training data that recipe sections ask for (synthetic captions)
        from .synthetic import synthetic_data_pipeline

        result += synthetic_data_pipeline(recipe)
    for stage in stages:
        result += stage_pipeline(stage)
    return result + capfilt
