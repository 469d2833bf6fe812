"""Retrain pipeline (scheduled retraining; the CronJob in k8s/base/pipeline-cronjobs.yaml runs it):

validate the current data -> plan (did the data or the configuration change since the champion was trained?) ->
train (every stage of the recipe; the stages that start fresh start from the champion with ``retrain.init:
champion``) -> merge -> evaluate -> register -> gate -> summary.

The plan node is tagged :data:`vlalign_pipelines.runner.PLAN_TAG`: with ``kedro run`` (whose default runner is
:class:`vlalign_pipelines.runner.PlannedRunner`) nothing after it runs when nothing changed, and nothing is
registered. Same datasets as the default pipeline, so outputs land where ``kedro run`` puts them.
"""

from __future__ import annotations

from functools import partial, update_wrapper

from kedro.pipeline import Pipeline, node, pipeline

from vlalign_pipelines.pipelines.evaluation.pipeline import create_pipeline as create_evaluation_pipeline
from vlalign_pipelines.pipelines.merge.pipeline import create_pipeline as create_merge_pipeline
from vlalign_pipelines.pipelines.registration.nodes import RUN_PARAMETERS
from vlalign_pipelines.pipelines.registration.pipeline import EVALUATED_INPUTS
from vlalign_pipelines.pipelines.training.nodes import training_rows
from vlalign_pipelines.pipelines.training.pipeline import stage_pipeline
from vlalign_pipelines.pipelines.validation.pipeline import create_pipeline as create_validation_pipeline
from vlalign_pipelines.recipes import StagePlan, project_plan
from vlalign_pipelines.runner import PLAN_TAG

from .nodes import (fetch_init, gate_retrained_model, plan_retrain, register_retrained_model, summarise_retrain,
                    train_from_init)

PARAMS = {name: f"params:{name}" for name in RUN_PARAMETERS}


def fresh_stage_pipeline(stage: StagePlan) -> Pipeline:
    """A stage the recipe starts from fresh weights: it also reads ``retrain_init`` (the champion, or nothing)."""
    func = update_wrapper(partial(train_from_init, stage_name=stage.name), train_from_init)
    inputs = ["train_data", "stage_dir", "params:model", "params:training", "params:kubernetes", "retrain_init"]
    base = pipeline([node(func, inputs=inputs, outputs="final_checkpoint", name="train")])
    return pipeline(base, namespace=stage.name, inputs={"train_data": stage.data, "retrain_init": "retrain_init"},
                    parameters={"params:model", "params:training", "params:kubernetes"})


def create_pipeline(**kwargs) -> Pipeline:
    plan = [
        node(plan_retrain, inputs={"clean_manifest": "clean_manifest", **PARAMS, "retrain": "params:retrain"},
             outputs="retrain_plan", name="plan_retrain", tags=[PLAN_TAG]),
        node(fetch_init, inputs=["retrain_plan", "retrain_init_dir"], outputs="retrain_init", name="fetch_retrain_init"),
    ]
    training = Pipeline([node(training_rows, inputs="clean_manifest", outputs="train_shards", name="write_training_shards")])
    for stage in project_plan().stages:
        training += fresh_stage_pipeline(stage) if stage.init is None else stage_pipeline(stage)
    register = [
        node(register_retrained_model,
             inputs={"retrain_plan": "retrain_plan", "retrain_init": "retrain_init", "retrain": "params:retrain",
                     "checkpoint": "merged_checkpoint", "manifest": "clean_manifest", "metrics": "metrics",
                     "validation_report": "validation_report", **EVALUATED_INPUTS, **PARAMS},
             outputs="registered_model", name="register_retrained_model"),
        node(gate_retrained_model, inputs=["registered_model", "params:registration"], outputs="gate_decision",
             name="gate_retrained_model"),
        node(summarise_retrain, inputs=["retrain_plan", "gate_decision"], outputs="retrain_summary",
             name="summarise_retrain"),
    ]
    return (create_validation_pipeline() + pipeline(plan) + training + create_merge_pipeline()
            + create_evaluation_pipeline() + pipeline(register))
