"""Merge pipeline: interpolate the last two stages' weights, beta swept on validation data."""

from kedro.pipeline import Pipeline, node, pipeline

from vlalign_pipelines.pipelines.training.pipeline import stage_names

from .nodes import merge_stage_checkpoints


def create_pipeline(**kwargs) -> Pipeline:
    names = kwargs.get("stages") or stage_names()
    if len(names) < 2:
        theta1 = theta2 = f"{names[-1]}.final_checkpoint"
    else:
        theta1, theta2 = f"{names[-1]}.final_checkpoint", f"{names[-2]}.final_checkpoint"
    return pipeline(
        [
            node(
                merge_stage_checkpoints,
                inputs=[theta1, theta2, "clean_manifest", "params:merge"],
                outputs=["merged_checkpoint", "merge_sweep"],
                name="merge_stage_checkpoints",
            )
        ]
    )
