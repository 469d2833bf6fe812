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

from .nodes import train_one_stage, training_rows


def stage_names(conf_source: str | Path = "conf", env: str | None = None) -> list[str]:
    """Stage names in order, as ``training.stages`` lists them in the project configuration.

    The pipeline registry runs before Kedro hands the ``--env`` of ``kedro run`` to anything, so the
    environment comes from ``KEDRO_ENV``, which the project's ``kedro run`` (vlalign_pipelines.cli) sets
    from ``--env``. The project's config loader is used, so paths written with ``${globals:run_dir}`` resolve.
    """
    env = env or os.environ.get("KEDRO_ENV") or DEFAULT_ENV
    loader = RunConfigLoader(conf_source=str(conf_source), env=env, **CONFIG_LOADER_ARGS)
    stages = (loader["parameters"].get("training") or {}).get("stages")
    if not stages or not all(isinstance(s, dict) and s.get("name") for s in stages):
        raise ConfigError(
            f"no list of named stages at `training.stages` in the parameters under {conf_source} "
            f"(environments base and {env}); define it in conf/base/parameters_training.yml, e.g. "
            "`training: {stages: [{name: stage1, ...}, {name: stage2, ...}]}`."
        )
    return [stage["name"] for stage in stages]


def stage_pipeline(stage_name: str, previous: str | None) -> Pipeline:
    """The training node for ``stage_name``, namespaced, starting from ``previous``'s final checkpoint."""
    inputs = ["train_shards", "stage_dir", "params:model", "params:training", "params:kubernetes"]
    mapping = {"train_shards": "train_shards"}
    if previous is not None:
        inputs.append("init_checkpoint")
        mapping["init_checkpoint"] = f"{previous}.final_checkpoint"
    func = update_wrapper(partial(train_one_stage, stage_name=stage_name), train_one_stage)
    base = pipeline([node(func, inputs=inputs, outputs="final_checkpoint", name="train")])
    return pipeline(base, namespace=stage_name, inputs=mapping,
                    parameters={"params:model", "params:training", "params:kubernetes"})


def create_pipeline(**kwargs) -> Pipeline:
    names = kwargs.get("stages") or stage_names()
    stages = Pipeline([node(training_rows, inputs="clean_manifest", outputs="train_shards", name="write_training_shards")])
    for index, name in enumerate(names):
        stages += stage_pipeline(name, names[index - 1] if index else None)
    return stages
