"""One real default run (`test` environment: tiny data, 4-step stages) in a temporary git checkout, shared by the
audit and retrain tests of this folder.

The checkout holds the project's pyproject.toml, conf/, src/ and .gitignore, committed, so the run's lineage
records a real commit and a clean tree; its MLflow store is a sqlite file inside it. Tests that change something
(the data, the code, the registered weights) put it back before they end.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from vlalign_pipelines.runner import PlannedRunner

REPO = Path(__file__).resolve().parents[3]


def git(project: Path, *args: str) -> str:
    done = subprocess.run(["git", "-c", "user.email=test@example.com", "-c", "user.name=test", *args], cwd=project,
                          capture_output=True, text=True, check=True)
    return done.stdout


def run_pipeline(project: Path, pipeline: str | None = None, params: dict | None = None) -> None:
    """One `kedro run` in ``project`` (env test), with the runner `kedro run` picks for that pipeline."""
    bootstrap_project(project)
    with KedroSession.create(project_path=project, env="test", runtime_params=params) as session:
        session.run(pipeline_name=pipeline, runner=PlannedRunner() if pipeline == "retrain" else None)


@pytest.fixture(scope="package")
def governed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The project after one default run: ``{"project", "data", "registered", "uri"}`` (uri = its champion)."""
    root = tmp_path_factory.mktemp("governance")
    project = root / "project"
    project.mkdir()
    for name in ("pyproject.toml", ".telemetry", ".gitignore"):
        shutil.copy(REPO / name, project / name)
    shutil.copytree(REPO / "conf", project / "conf", ignore=shutil.ignore_patterns("local"))
    (project / "conf" / "local").mkdir()
    (project / "conf" / "local" / ".gitkeep").touch()
    shutil.copytree(REPO / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    git(project, "init", "-q")
    git(project, "add", ".")
    git(project, "commit", "-q", "-m", "project")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        mp.setenv("KEDRO_ENV", "test")
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("VLALIGN_HASH_STATE_DIR", str(root / "hash-state"))
        mp.delenv("VLALIGN_RECIPE", raising=False)
        mp.delenv("VLALIGN_RUN_NAME", raising=False)
        run_pipeline(project)
        data = project / "data" / "runs" / "test" / "default"
        registered = json.loads((data / "08_reporting" / "registered_model.json").read_text())
        yield {"project": project, "data": data, "registered": registered,
               "uri": f"models:/{registered['name']}@champion", "root": root}
        mlflow.set_tracking_uri(None)
