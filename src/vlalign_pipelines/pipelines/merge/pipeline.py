"""Merge pipeline: interpolate two stages' weights (the recipe's ``merge`` pair; by default the last two), beta swept
on validation data."""

from kedro.pipeline import Pipeline, node, pipeline

from vlalign_pipelines.recipes import project_plan

from .nodes import merge_stage_checkpoints


def create_pipeline(**kwargs) -> Pipeline:
    if kwargs.get("stages"):
        names = list(kwargs["stages"])
        pair = (names[-1], names[-2] if len(names) > 1 else names[-1])
    else:
        pair = project_plan().merge
    theta1, theta2 = (f"{stage}.final_checkpoint" for stage in pair)
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
