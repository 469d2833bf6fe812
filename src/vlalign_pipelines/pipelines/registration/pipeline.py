"""Registration pipeline: the merged model goes to the MLflow Model Registry with its lineage."""

from kedro.pipeline import Pipeline, node, pipeline

from .nodes import register_merged_model


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                register_merged_model,
                inputs=["merged_checkpoint", "clean_manifest", "metrics", "validation_report", "params:registration"],
                outputs="registered_model",
                name="register_merged_model",
            )
        ]
    )
