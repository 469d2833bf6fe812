"""CapFilt pipeline: after the stage named by the recipe's ``capfilt.after``, caption and filter the training rows;
the filtered corpus is the catalog dataset ``capfilt_shards`` that a later stage trains on (its ``data`` key)."""

from __future__ import annotations

from kedro.pipeline import Pipeline, node

from vlalign.errors import ConfigError
from vlalign_pipelines.recipes import RecipePlan, project_plan

from .nodes import capfilt_corpus


def capfilt_pipeline(after: str) -> Pipeline:
    """The CapFilt node reading stage ``after``'s final checkpoint."""
    return Pipeline([node(capfilt_corpus, inputs=[f"{after}.final_checkpoint", "clean_manifest", "params:training"],
                          outputs=["capfilt_manifest", "capfilt_shards", "capfilt_report", "capfilt_report_html"],
                          name="capfilt")])


def for_plan(recipe: RecipePlan) -> Pipeline:
    """The recipe's CapFilt step, or an empty pipeline when it has no ``capfilt`` section."""
    section = recipe.sections.get("capfilt")
    if section is None:
        return Pipeline([])
    after = section.get("after") if isinstance(section, dict) else None
    names = [stage.name for stage in recipe.stages]
    if after not in names:
        raise ConfigError(f"training.recipes.{recipe.name}.capfilt.after={after!r}: expected one of the recipe's "
                          f"stages {names}.")
    return capfilt_pipeline(after)


def create_pipeline(**kwargs) -> Pipeline:
    return for_plan(project_plan())
