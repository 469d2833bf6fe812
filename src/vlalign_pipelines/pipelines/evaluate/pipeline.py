"""Evaluate pipeline: the evaluation nodes on the model named by ``model_uri``, not the merged checkpoint.

``kedro run --pipeline evaluate --params model_uri=models:/vlalign-clip/3`` (or a checkpoint path).
Validation runs first, so the pipeline needs nothing but the raw data and the model; outputs are
prefixed ``evaluate.`` (``data/08_reporting/evaluate/``) and never overwrite the default run's.
It is not part of ``__default__``.
"""

from kedro.pipeline import Pipeline, node, pipeline

from vlalign_pipelines.pipelines.evaluation.pipeline import evaluation_nodes
from vlalign_pipelines.pipelines.validation.pipeline import create_pipeline as create_validation_pipeline

from .nodes import evaluate_params, load_model_from_uri


def create_pipeline(**kwargs) -> Pipeline:
    resolve = [
        node(load_model_from_uri, inputs="params:model_uri", outputs="evaluate.checkpoint", name="evaluate.load_model"),
        node(evaluate_params, inputs=["params:evaluation", "params:evaluate", "params:model_uri"],
             outputs="evaluate.params", name="evaluate.resolve_params"),
    ]
    return create_validation_pipeline() + pipeline(resolve + evaluation_nodes("evaluate.checkpoint", "evaluate.params",
                                                                                prefix="evaluate."))
