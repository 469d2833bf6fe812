"""Merge pipeline: interpolate two stages' weights (the recipe's ``merge`` pair; by default the last two), beta swept
on validation data; with a recipe ``soup`` section, uniform and greedy soups of its stages and the merge plot."""

from kedro.pipeline import Pipeline, node, pipeline

from vlalign_pipelines.recipes import RecipePlan, project_plan

from .nodes import make_soups, merge_plot, merge_stage_checkpoints


def soup_pipeline(recipe: RecipePlan) -> Pipeline:
    """The soup and plot nodes of a recipe with a ``soup: {stages: [...]}`` section (else nothing)."""
    section = recipe.sections.get("soup")
    if not section:
        return Pipeline([])
    from vlalign.errors import ConfigError

    stages = list(section.get("stages") or [])
    known = [s.name for s in recipe.stages]
    unknown = [s for s in stages if s not in known]
    if not stages or unknown:
        raise ConfigError(f"training.recipes.{recipe.name}.soup.stages={stages}: expected stages of the recipe "
                          f"({known}); {unknown or 'none given'}.")
    return Pipeline([
        node(make_soups, inputs=["clean_manifest", "params:merge", "params:training",
                           *(f"{stage}.final_checkpoint" for stage in stages)],
             outputs=["uniform_soup_checkpoint", "greedy_soup_checkpoint", "soup_report"], name="make_soups"),
        node(merge_plot, inputs=["merge_sweep", "soup_report"], outputs="merge_plot", name="merge_plot"),
    ])


def create_pipeline(**kwargs) -> Pipeline:
    recipe = None
    if kwargs.get("stages"):
        names = list(kwargs["stages"])
        pair = (names[-1], names[-2] if len(names) > 1 else names[-1])
    else:
        recipe = project_plan()
        pair = recipe.merge
    theta1, theta2 = (f"{stage}.final_checkpoint" for stage in pair)
    result = pipeline(
        [
            node(
                merge_stage_checkpoints,
                inputs=[theta1, theta2, "clean_manifest", "params:merge"],
                outputs=["merged_checkpoint", "merge_sweep"],
                name="merge_stage_checkpoints",
            )
        ]
    )
    return result + soup_pipeline(recipe) if recipe is not None else result
