"""``kedro run`` reports expected failures in a few lines, and keeps the traceback for the log file.

The subprocess tests run the real command (``python -m kedro run``, which loads vlalign_pipelines.cli) in a
copied project, on validation-only pipelines and the tiny `test` dataset. The unit tests feed the wrapper
real exceptions raised by Kedro and the library.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kedro.io import AbstractDataset, DataCatalog
from kedro.pipeline import node, pipeline
from kedro.runner import SequentialRunner

from vlalign.data.demo import DemoConfig, generate_demo_dataset
from vlalign.errors import ConfigError, DatasetFormatError
from vlalign_pipelines.cli import RunLog, classify, format_failure, guarded_run, Failure

from conftest import REPO, make_project, run_dir

MAX_LINES = 20  # what a person should have to read


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow store for the module: its tables are created once (several seconds), not per test."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def kedro_run(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {
        **os.environ,
        "PYTHONPATH": str(REPO / "src"),  # this checkout's code, not an installed copy
        "MLFLOW_TRACKING_URI": (project.parent / "tracking_uri").read_text(),
        "HF_HUB_OFFLINE": "1",
        "KEDRO_DISABLE_TELEMETRY": "true",
        "COLUMNS": "100",
        **env,
    }
    for name in ("KEDRO_ENV", "VLALIGN_RUN_NAME", "VLALIGN_VERBOSE"):
        if name not in env:
            environ.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "kedro", "run", *args], cwd=project, env=environ, capture_output=True, text=True,
        timeout=300,
    )


def log_named_in(stderr: str, project: Path) -> Path:
    line = next(line for line in stderr.splitlines() if line.startswith("Full log with the traceback: "))
    path = Path(line.split(": ", 1)[1].split(" (or run again")[0])
    return path if path.is_absolute() else project / path


def check_short(result: subprocess.CompletedProcess, project: Path, *facts: str) -> str:
    """Exit status 1, a short message on stderr with ``facts``, no traceback anywhere, the traceback in the log.

    stderr may start with MLflow's own progress lines (e.g. creating a new store's tables); the message is
    everything from the ``Error:`` line on.
    """
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Error: kedro run failed")), None)
    assert start is not None, result.stderr
    assert len(lines) - start <= MAX_LINES, result.stderr
    message = " ".join(" ".join(lines[start:]).split())  # lines are wrapped at the terminal width
    for fact in facts:
        assert fact in message, f"{fact!r} not in:\n{result.stderr}"
    assert "Traceback" not in result.stderr + result.stdout
    log = log_named_in(result.stderr, project).read_text(encoding="utf-8")
    assert "Traceback (most recent call last)" in log
    return log


@pytest.fixture()
def project(tmp_path: Path, tracking_uri: str) -> Path:
    project = make_project(tmp_path)
    (tmp_path / "tracking_uri").write_text(tracking_uri)
    return project


def test_unknown_environment(project: Path) -> None:
    result = kedro_run(project, "--env", "nosuch", "--pipelines", "validation")
    log = check_short(result, project, "environment 'nosuch' not found", "conf/nosuch", "test")
    assert "ConfigError" in log
    assert not (project / "data" / "runs" / "nosuch").exists()

    verbose = kedro_run(project, "--env", "nosuch", "--pipelines", "validation", "--verbose")
    assert verbose.returncode == 1
    assert "Traceback (most recent call last)" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1].startswith("Full log with the traceback: ")


@pytest.mark.slow
def test_validation_threshold_exceeded(project: Path) -> None:
    """A corpus whose English captions are too short: the run stops and names the quarantine file."""
    config = yaml.safe_load((project / "conf" / "test" / "globals.yml").read_text())
    root = generate_demo_dataset(project / config["demo_root"], DemoConfig(**config["demo_config"]))
    corpus = root / "flickr_demo" / "dataset_demo.json"
    data = json.loads(corpus.read_text(encoding="utf-8"))
    for image in data["images"]:
        for sentence in image["sentences"]:
            sentence["raw"], sentence["tokens"] = "shape", ["shape"]
    corpus.write_text(json.dumps(data), encoding="utf-8")

    result = kedro_run(project, "--env", "test", "--pipelines", "validation")
    quarantine = "data/runs/test/default/04_quarantine/quarantine.csv"
    check_short(result, project, "ValidationFailedError", "caption_min_words_en", quarantine, "node `gate_clean_rows`")
    assert (project / quarantine).is_file()


@pytest.mark.slow
def test_missing_raw_file(project: Path) -> None:
    (project / "conf" / "elsewhere").mkdir()
    (project / "conf" / "elsewhere" / "catalog.yml").write_text(yaml.safe_dump({"raw_manifest": {
        "type": "vlalign_pipelines.datasets.ImageCaptionCorpusDataset",
        "sources": [{"json": "data/01_raw/absent/dataset_flickr30k.json", "image_root": "data/01_raw/absent/images",
                     "lang": "en"}],
    }}))
    result = kedro_run(project, "--env", "elsewhere", "--pipelines", "validation", "--params", "run_name=try1")
    check_short(result, project, "DatasetFormatError", "data/01_raw/absent/dataset_flickr30k.json",
                "loading dataset `raw_manifest`", "data/runs/elsewhere/try1/ (environment `elsewhere`, run name `try1`)")
    assert log_named_in(result.stderr, project).name.endswith("_elsewhere_try1.log")


@pytest.mark.slow
def test_bad_params_in_an_environment_with_its_own_stages(project: Path) -> None:
    """`--params model.name=...` is refused by name, in the stage the environment defines (KEDRO_ENV is set
    from --env, so the pipeline registry builds the environment's stage list, not conf/base's)."""
    (project / "conf" / "onestage").mkdir()
    (project / "conf" / "onestage" / "parameters_training.yml").write_text(yaml.safe_dump({"training": {
        "recipes": {"clip": {"stages": [{"name": "only", "max_steps": 1, "batch_size": 8, "checkpoint_every": 1}]}},
    }}))
    (project / "conf" / "onestage" / "globals.yml").write_text(yaml.safe_dump(
        yaml.safe_load((project / "conf" / "test" / "globals.yml").read_text())))
    result = kedro_run(project, "--env", "onestage", "--pipelines", "validation,training",
                       "--params", "model.name=no-such-model")
    check_short(result, project, "ConfigError", "'no-such-model'", "node `only.train`",
                "data/runs/onestage/default/")


# ---------------------------------------------------------------------------------------------------------
# The wrapper on real exceptions, in process
# ---------------------------------------------------------------------------------------------------------


class _BrokenCorpus(AbstractDataset):
    def load(self):
        raise DatasetFormatError("data/01_raw/x.json: images[3].sentences: expected a non-empty list.")

    def save(self, data):  # pragma: no cover - never saved
        raise NotImplementedError

    def _describe(self):
        return {}


def _kedro_error(catalog: DataCatalog, pipe) -> Exception:
    with pytest.raises(Exception) as info:
        SequentialRunner().run(pipe, catalog)
    return info.value


def test_classify_kedro_wrapped_library_error() -> None:
    error = _kedro_error(DataCatalog({"raw": _BrokenCorpus()}), pipeline([node(len, "raw", "n")]))
    assert type(error).__name__ == "DatasetError"  # Kedro's wrapper, with ours as the cause
    failure = classify(error)
    assert failure.kind == "DatasetFormatError" and "images[3].sentences" in failure.detail


def test_classify_missing_parameter_and_unexpected_errors() -> None:
    error = _kedro_error(DataCatalog(), pipeline([node(lambda p: p, "params:merge", "out")]))
    failure = classify(error)
    assert failure.kind == "missing configuration" and "parameter(s) merge" in failure.detail
    assert classify(RuntimeError("CUDA out of memory")) is None
    assert classify(KeyError("x")) is None


def test_classify_missing_kedro_environment(tmp_path: Path) -> None:
    from kedro.config import OmegaConfigLoader

    (tmp_path / "base").mkdir()
    with pytest.raises(Exception) as info:
        OmegaConfigLoader(str(tmp_path), env="nope", base_env="base", default_run_env="local")["parameters"]
    assert classify(info.value).kind == "MissingConfigException"


def test_expected_failure_is_short_and_logged(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def body():
        raise ConfigError("stage 'stage2': lr=-1, expected a number > 0.\n" + "detail line\n" * 40)

    with RunLog(tmp_path / "run.log", quiet_console=True) as run_log:
        with pytest.raises(SystemExit) as exit_info:
            guarded_run(body, command="kedro run", run_log=run_log, verbose=False)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) <= MAX_LINES and "more lines in the log file" in err
    assert "lr=-1" in err and "Traceback" not in err
    assert "Traceback (most recent call last)" in (tmp_path / "run.log").read_text()


def test_unexpected_failure_keeps_its_traceback_and_the_held_records(tmp_path: Path) -> None:
    console = logging.StreamHandler(stream := __import__("io").StringIO())
    root = logging.getLogger()
    root.addHandler(console)
    try:
        def body():
            logging.getLogger("kedro.pipeline.node").error("Node %s failed with error: \n%s", "train", "boom")
            raise RuntimeError("boom")

        with RunLog(tmp_path / "run.log", quiet_console=True) as run_log:
            with pytest.raises(RuntimeError, match="boom"):
                guarded_run(body, command="kedro run", run_log=run_log, verbose=False)
    finally:
        root.removeHandler(console)
    assert "failed with error" in stream.getvalue()  # held back during the run, printed for an unexpected error
    assert "RuntimeError: boom" in (tmp_path / "run.log").read_text()


def test_message_layout() -> None:
    text = format_failure(
        Failure("ValidationFailedError", "Data validation rejected 3 of 4 rows.", "Fix the data."),
        command="kedro run", where="in node `gate_clean_rows`", outputs="data/runs/test/default/",
        log_file=Path("/tmp/x.log"), width=80,
    )
    assert text.splitlines() == [
        "Error: kedro run failed (ValidationFailedError) in node `gate_clean_rows`:",
        "  Data validation rejected 3 of 4 rows.",
        "  Fix the data.",
        "Outputs of this run: data/runs/test/default/",
        "Full log with the traceback: /tmp/x.log (or run again with --verbose)",
    ]
