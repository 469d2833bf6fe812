"""Kedro project settings for vlalign.

kedro-mlflow registers its hook through its entry point, so it is not repeated here.

Where a run writes: every output path in the catalog and the parameters starts with ``${globals:run_dir}``
(``${run_dir}`` inside globals.yml), which :class:`RunConfigLoader` computes from the Kedro environment
and the run name (see :func:`run_location`); environments cannot set it, so two environments or two run
names never share an output folder. Raw inputs (``data/01_raw``) are shared and read-only.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kedro.config import OmegaConfigLoader
from omegaconf import OmegaConf

from vlalign.errors import ConfigError
from vlalign_pipelines.cli import RunPositionHook
from vlalign_pipelines.hooks import RuntimeHooks

#: The environment a run uses without ``--env`` / ``KEDRO_ENV`` (Kedro's default run environment).
DEFAULT_ENV = "local"
#: The run name without ``--params run_name=...`` / ``VLALIGN_RUN_NAME``.
DEFAULT_RUN_NAME = "default"
#: Environment variable read for the run name when ``--params run_name=...`` is not given.
RUN_NAME_ENV_VAR = "VLALIGN_RUN_NAME"
#: Output root of the default run (default environment, default run name): today's simple paths.
DEFAULT_RUN_DIR = "data"
#: Output roots of every other run: ``<RUNS_ROOT>/<env>/<run_name>``.
RUNS_ROOT = "data/runs"
#: Keys of ``globals`` computed by :class:`RunConfigLoader`; a globals.yml that sets one is refused.
COMPUTED_GLOBALS = ("run_dir", "run_env", "run_name")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class RunLocation:
    """Where one (environment, run name) pair writes its outputs."""

    env: str       # the Kedro environment (``local`` when none is given)
    run_name: str  # the run name (``default`` when none is given)
    run_dir: str   # output root relative to the project: ``data`` or ``data/runs/<env>/<run_name>``

    @property
    def is_default(self) -> bool:
        """True for the default run, which keeps the simple ``data/...`` paths that dvc.yaml tracks."""
        return self.run_dir == DEFAULT_RUN_DIR

    def as_globals(self) -> dict[str, str]:
        """The computed ``globals`` keys."""
        return {"run_dir": self.run_dir, "run_env": self.env, "run_name": self.run_name}


def check_name(value: Any, what: str) -> str:
    """``value`` if it is usable as one folder name, else a :class:`ConfigError` saying what is allowed."""
    text = str(value)
    if not _NAME.fullmatch(text) or text in (".", ".."):
        raise ConfigError(
            f"{what}={text!r} cannot name an output folder: expected 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/', no spaces). Pick another name."
        )
    return text


def run_name_from(runtime_params: dict[str, Any] | None) -> str:
    """The run name: ``--params run_name=...``, else ``$VLALIGN_RUN_NAME``, else the training recipe when it is not
    the default one (``--params training.recipe=albef`` writes under ``.../albef``), else ``default``."""
    from vlalign_pipelines.recipes import DEFAULT_RECIPE, recipe_from

    value = (runtime_params or {}).get("run_name")
    if value is None or value == "":
        recipe = recipe_from(runtime_params)
        value = os.environ.get(RUN_NAME_ENV_VAR) or (recipe if recipe and recipe != DEFAULT_RECIPE else DEFAULT_RUN_NAME)
    return check_name(value, "run_name")


def run_location(env: str | None, run_name: str = DEFAULT_RUN_NAME) -> RunLocation:
    """Output root of a run: ``data`` for the default environment and run name, else ``data/runs/<env>/<run_name>``.

    A pure function of the two names, so no environment can collide with the default or with another
    environment by forgetting to set something. A training recipe other than the default
    (``training.recipe=albef``) names the run when no run name is given.
    """
    env = check_name(env or DEFAULT_ENV, "environment")
    run_name = check_name(run_name, "run_name")
    if env == DEFAULT_ENV and run_name == DEFAULT_RUN_NAME:
        return RunLocation(env, run_name, DEFAULT_RUN_DIR)
    return RunLocation(env, run_name, f"{RUNS_ROOT}/{env}/{run_name}")


class RunConfigLoader(OmegaConfigLoader):
    """Kedro's ``OmegaConfigLoader`` plus the computed globals ``run_dir``, ``run_env`` and ``run_name``.

    They are added to the raw globals of both the base and the run environment before interpolation,
    so globals.yml can write ``${run_dir}/04_quarantine/quarantine.csv`` and the catalog and parameters
    ``${globals:run_dir}/...``.
    """

    def __init__(
        self,
        conf_source: str | Path,
        env: str | None = None,
        runtime_params: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        effective_env = env or kwargs.get("default_run_env") or DEFAULT_ENV
        self.run_location = run_location(effective_env, run_name_from(runtime_params))
        super().__init__(conf_source, env, runtime_params, **kwargs)

    def __getitem__(self, key: str) -> dict[str, Any]:
        # OmegaConf resolvers are process-wide and Kedro binds `globals:` to the loader created last. The
        # pipeline registry creates its own loader (training.pipeline.stage_names) after the session's and
        # before the catalog is read; rebinding here makes every loader resolve with its own run_dir.
        self._register_globals_resolver()
        return super().__getitem__(key)

    def _read_raw_config(self, key: str) -> tuple:
        base, env_configs, base_path, env_path, processed = super()._read_raw_config(key)
        if key == "globals":
            for configs in (base, env_configs):
                for path, config in configs.items():
                    clash = sorted(set(config) & set(COMPUTED_GLOBALS))
                    if clash:
                        raise ConfigError(
                            f"{path}: sets {clash}, which vlalign computes from the environment and the run "
                            f"name ({RUNS_ROOT}/<env>/<run_name>, or {DEFAULT_RUN_DIR} for the default run). "
                            "Remove the key; choose another output folder with --params run_name=NAME."
                        )
            computed = OmegaConf.create(self.run_location.as_globals())
            marker = Path("<computed by vlalign_pipelines.settings.RunConfigLoader>")
            base = {**base, marker: computed}
            env_configs = {**env_configs, marker: computed}
        return base, env_configs, base_path, env_path, processed


# RunPositionHook records the node / dataset a failing run was at, for the short error message of `kedro run`.
HOOKS = (RuntimeHooks(), RunPositionHook())

CONFIG_LOADER_CLASS = RunConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": DEFAULT_ENV,
    # An environment overrides only the parameter keys it names (e.g. evaluation.lang), not whole blocks.
    "merge_strategy": {"parameters": "soft"},
    "config_patterns": {
        "mlflow": ["mlflow*", "mlflow*/**"],
    },
}
