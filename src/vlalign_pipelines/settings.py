"""Kedro project settings for vlalign.

kedro-mlflow registers its hook through its entry point, so it is not repeated here.
"""

from kedro.config import OmegaConfigLoader

from vlalign_pipelines.hooks import RuntimeHooks

HOOKS = (RuntimeHooks(),)

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # An environment overrides only the parameter keys it names (e.g. evaluation.lang), not whole blocks.
    "merge_strategy": {"parameters": "soft"},
    "config_patterns": {
        "mlflow": ["mlflow*", "mlflow*/**"],
    },
}
