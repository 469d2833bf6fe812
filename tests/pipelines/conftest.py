"""Shared set-up for tests that run the real Kedro project in a temporary copy.

The copy holds pyproject.toml and conf/ (not conf/local), so a run writes its data layers, checkpoints
and MLflow store into the temporary folder, never into the working tree.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest

from vlalign_pipelines.settings import run_location

REPO = Path(__file__).resolve().parents[2]


def run_dir(project: Path, env: str | None = None, run_name: str = "default") -> Path:
    """Output root of a run in ``project``: ``data`` for the default run, ``data/runs/<env>/<run_name>`` else."""
    return project / run_location(env, run_name).run_dir


def make_project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO / "pyproject.toml", project / "pyproject.toml")
    shutil.copy(REPO / ".telemetry", project / ".telemetry")
    shutil.copytree(REPO / "conf", project / "conf", ignore=shutil.ignore_patterns("local"))
    (project / "conf" / "local").mkdir()
    (project / "src").mkdir()  # kedro wants it; the packages are imported from the installed project
    return project


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copied project, as the working directory, with env `test`, its own sqlite MLflow store, offline."""
    project = make_project(tmp_path)
    monkeypatch.chdir(project)
    monkeypatch.setenv("KEDRO_ENV", "test")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield project
    mlflow.set_tracking_uri(None)
