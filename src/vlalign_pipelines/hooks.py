"""Process-wide runtime settings applied before a Kedro pipeline runs."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

log = logging.getLogger(__name__)


class RuntimeHooks:
    """Keeps runs offline and sets the number of CPU threads torch may use."""

    @hook_impl(tryfirst=True)
    def after_context_created(self, context: Any) -> None:
        # Runs before kedro-mlflow's hook, which reads MLFLOW_TRACKING_URI when mlflow.yml leaves it null.
        # Nothing is downloaded at run time: hub look-ups fail fast instead of hanging.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
        default_store = f"sqlite:///{Path(context.project_path).resolve() / 'mlflow.db'}"
        os.environ.setdefault("MLFLOW_TRACKING_URI", default_store)
        log.info("MLflow tracking URI: %s", os.environ["MLFLOW_TRACKING_URI"])

    @staticmethod
    def _set_threads() -> None:
        import torch

        threads = int(os.environ.get("VLALIGN_NUM_THREADS", os.cpu_count() or 1))
        torch.set_num_threads(max(1, threads))
        log.info("torch uses %d CPU threads (set VLALIGN_NUM_THREADS to change)", torch.get_num_threads())

    @hook_impl(trylast=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        self._set_threads()
        # The code that runs, as the lineage of a registered model records it (not the tree at registration).
        from vlalign.tracking.lineage import remember_code_state

        remember_code_state(run_params.get("project_path") or ".")
        # Under `dvc repro` / `dvc exp run`, tag the MLflow run (kedro-mlflow's, started by then: this hook runs
        # last) with the DVC stage and experiment, so `dvc exp show` rows and MLflow runs can be matched.
        from vlalign.tracking.lineage import dvc_environment

        found = dvc_environment()
        if found:
            import mlflow

            if mlflow.active_run() is not None:
                mlflow.set_tags({f"dvc.{key}": value for key, value in found.items()})

    @hook_impl
    def on_pipeline_error(self, error: Exception, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        from vlalign.tracking.lineage import forget_code_state

        forget_code_state(run_params.get("project_path") or ".")

    @hook_impl(trylast=True)
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        from vlalign.tracking.lineage import forget_code_state
        from vlalign.tracking.mlflow import close_leftover_runs

        forget_code_state(run_params.get("project_path") or ".")
        ended = close_leftover_runs()
        if ended:
            log.debug("closed %d MLflow run(s) left on the run stack", ended)
