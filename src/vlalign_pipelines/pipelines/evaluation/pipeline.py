"""Evaluation pipeline: the merged model on the test split and the zero-shot set."""

from kedro.pipeline import Pipeline, node, pipeline

from .nodes import evaluate_model, write_report


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                evaluate_model,
                inputs=["merged_checkpoint", "clean_manifest", "zero_shot_set", "params:evaluation"],
                outputs=["metrics", "evaluation_details"],
                name="evaluate_model",
            ),
            node(write_report, inputs=["evaluation_details", "params:evaluation"], outputs="report_files", name="write_report"),
        ]
    )
