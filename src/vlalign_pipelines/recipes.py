"""Training recipes: named stage lists (and model changes) selected with ``--params training.recipe=<name>``.

``conf/base/parameters_training.yml`` holds ``training.stage_defaults`` (every StageConfig field) and
``training.recipes.<name>``: ``stages`` (each entry only says what differs from the defaults), and optionally
``model`` (overrides merged into ``params:model``, e.g. ``arch: fusion``), ``merge`` (which two stages the
merge pipeline interpolates; default the last two) and recipe-specific sections (e.g. ``capfilt``). A stage may
name its training ``data`` (a catalog dataset of shards; default ``train_shards``) and its ``init`` (a stage
whose final checkpoint it starts from; default the previous stage, ``null`` for fresh weights).

The recipe decides the pipeline's shape, which Kedro builds before a session hands runtime parameters to
anything; so the project's ``kedro run`` also puts ``--params training.recipe=...`` into ``$VLALIGN_RECIPE``
(tests and scripts can set it themselves). A recipe other than the default also names the run's output folder
(``data/runs/<env>/<recipe>``) unless ``run_name`` is given, so recipes never overwrite each other.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlalign.errors import ConfigError

DEFAULT_RECIPE = "clip"
RECIPE_ENV_VAR = "VLALIGN_RECIPE"
DEFAULT_DATA = "train_shards"
#: Keys of a recipe's stage entry that are pipeline wiring, not StageConfig fields.
WIRING_KEYS = ("data", "init")


@dataclass(frozen=True)
class StagePlan:
    """Where one stage sits in the pipeline."""

    name: str  # the stage's name and Kedro namespace
    data: str = DEFAULT_DATA  # catalog dataset of the shards it trains on
    init: str | None = None  # the stage whose final checkpoint it starts from (None: fresh weights)
    mixture: tuple[tuple[str, int], ...] = ()  # several shard datasets with integer weights: data = <name>.mixed_shards


@dataclass(frozen=True)
class RecipePlan:
    """The pipeline shape of a recipe."""

    name: str  # recipe name
    stages: list[StagePlan] = field(default_factory=list)  # in run order
    merge: tuple[str, str] = ("", "")  # (theta1 stage, theta2 stage): theta = beta*theta1 + (1-beta)*theta2
    sections: dict[str, Any] = field(default_factory=dict)  # recipe-specific sections (e.g. capfilt)


def recipe_from(runtime_params: dict[str, Any] | None) -> str | None:
    """The recipe asked for on the command line (``--params training.recipe=X``) or in ``$VLALIGN_RECIPE``."""
    params = runtime_params or {}
    training = params.get("training")
    value = training.get("recipe") if isinstance(training, dict) else None
    value = value or params.get("training.recipe") or os.environ.get(RECIPE_ENV_VAR)
    return str(value) if value else None


def _recipe(training: dict[str, Any], name: str | None) -> tuple[str, dict[str, Any]]:
    name = name or training.get("recipe") or DEFAULT_RECIPE
    recipes = training.get("recipes") or {}
    if name not in recipes:
        raise ConfigError(f"training.recipe={name!r} is not defined; the recipes are {sorted(recipes)} "
                          "(training.recipes in conf/base/parameters_training.yml).")
    recipe = recipes[name]
    if not isinstance(recipe, dict) or not isinstance(recipe.get("stages"), list) or not recipe["stages"]:
        raise ConfigError(f"training.recipes.{name}: expected a mapping with a non-empty `stages` list.")
    return name, recipe


def resolve_stages(training: dict[str, Any], recipe: str | None = None) -> list[dict[str, Any]]:
    """The recipe's stages as complete StageConfig dicts (``stage_defaults`` + the entry; wiring keys dropped)."""
    name, body = _recipe(training, recipe)
    defaults = training.get("stage_defaults") or {}
    stages = []
    for k, entry in enumerate(body["stages"]):
        if not isinstance(entry, dict) or not entry.get("name"):
            raise ConfigError(f"training.recipes.{name}.stages[{k}]: expected a mapping with a `name`.")
        stage = {**copy.deepcopy(defaults), **{key: v for key, v in entry.items() if key not in WIRING_KEYS}}
        stages.append(stage)
    return stages


def stage_params(training: dict[str, Any], stage_name: str, recipe: str | None = None) -> dict[str, Any]:
    """The complete parameters of stage ``stage_name`` of the recipe."""
    for stage in resolve_stages(training, recipe):
        if stage["name"] == stage_name:
            return stage
    name, body = _recipe(training, recipe)
    raise ConfigError(
        f"recipe {name!r} has no stage named {stage_name!r} (it has {[s['name'] for s in body['stages']]}). The "
        f"pipeline was built for another recipe: set {RECIPE_ENV_VAR} (the project's `kedro run` does it from "
        "--params training.recipe=...) or run the pipeline through `kedro run`."
    )


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else copy.deepcopy(value)
    return out


def resolve_model(model: dict[str, Any], training: dict[str, Any], recipe: str | None = None) -> dict[str, Any]:
    """``params:model`` with the recipe's ``model.overrides`` merged into its overrides (e.g. ``{arch: fusion}``), so a
    recipe combines with any model name an environment or the command line picks."""
    _, body = _recipe(training, recipe)
    extra = body.get("model") or {}
    merged = copy.deepcopy(model)
    merged["overrides"] = _deep_merge(model.get("overrides") or {}, extra.get("overrides") or {})
    return merged


def resolved_training(training: dict[str, Any], recipe: str | None = None) -> dict[str, Any]:
    """``{"recipe": name, "stages": [complete stage dicts]}``: what a run trained with, as lineage records it (a
    ``training`` that already lists its ``stages`` is returned as is)."""
    if "stages" in training:
        return training
    name, _ = _recipe(training, recipe)
    return {"recipe": name, "stages": resolve_stages(training, name)}


def _stage_data(value: Any, where: str, stage: str) -> tuple[str, tuple[tuple[str, int], ...]]:
    """A stage's ``data``: one catalog dataset of shards (``train_shards``), or a mixture of several, as a list
    (``[train_shards, synthetic_shards]``: each once) or a mapping to integer weights (``{train_shards: 1,
    synthetic_shards: 2}``: how many times each one's samples enter the mixture, written as ``<stage>.mixed_shards``)."""
    if isinstance(value, str):
        return value, ()
    if isinstance(value, list):
        value = {name: 1 for name in value} if len(set(map(str, value))) == len(value) else value
    if isinstance(value, dict) and value and all(isinstance(k, str) for k in value) and all(
            isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in value.values()):
        return f"{stage}.mixed_shards", tuple((k, int(w)) for k, w in value.items())
    raise ConfigError(f"{where}={value!r}: expected a catalog dataset of shards (e.g. train_shards), a list of distinct "
                      "ones, or a mapping of them to integer weights >= 1 (e.g. {train_shards: 1, synthetic_shards: 2}).")


def plan(training: dict[str, Any], recipe: str | None = None) -> RecipePlan:
    """The pipeline shape of the recipe: stages with their data and init, the merge pair, extra sections."""
    name, body = _recipe(training, recipe)
    stages: list[StagePlan] = []
    names = [entry["name"] for entry in body["stages"]]
    for k, entry in enumerate(body["stages"]):
        init = entry["init"] if "init" in entry else (names[k - 1] if k else None)
        if init is not None and init not in names[:k]:
            raise ConfigError(f"training.recipes.{name}.stages[{k}].init={init!r}: expected an earlier stage "
                              f"of the recipe ({names[:k]}) or null.")
        data, mixture = _stage_data(entry.get("data", DEFAULT_DATA), f"training.recipes.{name}.stages[{k}].data",
                                    entry["name"])
        stages.append(StagePlan(entry["name"], data, init, mixture))
    merge = body.get("merge") or {}
    pair = (merge.get("theta1", names[-1]), merge.get("theta2", names[-2] if len(names) > 1 else names[-1]))
    for stage in pair:
        if stage not in names:
            raise ConfigError(f"training.recipes.{name}.merge names stage {stage!r}, which the recipe lacks ({names}).")
    sections = {k: v for k, v in body.items() if k not in ("stages", "model", "merge", "description")}
    return RecipePlan(name, stages, pair, sections)


def project_plan(conf_source: str | Path = "conf", env: str | None = None, recipe: str | None = None) -> RecipePlan:
    """The recipe plan from the project configuration (base + ``$KEDRO_ENV``) and ``$VLALIGN_RECIPE``."""
    from vlalign_pipelines.settings import CONFIG_LOADER_ARGS, DEFAULT_ENV, RunConfigLoader

    env = env or os.environ.get("KEDRO_ENV") or DEFAULT_ENV
    loader = RunConfigLoader(conf_source=str(conf_source), env=env, **CONFIG_LOADER_ARGS)
    training = loader["parameters"].get("training") or {}
    if not training.get("recipes"):
        raise ConfigError(f"no `training.recipes` in the parameters under {conf_source} (environments base and {env}); "
                          "define them in conf/base/parameters_training.yml.")
    return plan(training, recipe or recipe_from(None))
