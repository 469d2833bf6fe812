"""Project commands for ``kedro``: a ``run`` that reports expected failures in a few lines.

Kedro loads this module's ``cli`` group and its ``run`` replaces the built-in one (``kedro run`` and
``python -m vlalign_pipelines`` both use it). It takes the same options, plus ``--verbose``, and:

- runs the ``retrain`` pipeline with :class:`vlalign_pipelines.runner.PlannedRunner` unless ``--runner`` is given
  (its plan node ends the run early when nothing changed);
- sets ``KEDRO_ENV`` from ``--env``, ``VLALIGN_RECIPE`` from ``--params training.recipe=...`` and
  ``VLALIGN_RUN_NAME`` from ``--params run_name=...`` (or the recipe) before the session
  is created, so the pipeline registry (which reads the list of training stages) sees the environment;
- refuses an environment with no folder under ``conf/`` or an unusable run name before anything runs;
- writes the whole log of the run, tracebacks included, to ``data/logs/<time>_<env>_<run_name>.log``;
- on an *expected* failure (a :class:`vlalign.errors.VLAlignError` anywhere in the exception chain, or a Kedro
  configuration error: missing environment or config files, a bad interpolation, a missing parameter or
  dataset, an unknown pipeline or node) prints a short message (what failed, where, what to do, the log file)
  to stderr instead of the traceback and exits with status 1. ``--verbose`` or ``VLALIGN_VERBOSE=1`` prints
  the traceback as well. Any other error keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import click
from kedro.framework.cli.project import run as kedro_run
from kedro.framework.cli.utils import CONTEXT_SETTINGS
from kedro.framework.hooks import hook_impl

from vlalign import reproducibility
from vlalign.errors import ConfigError, exception_chain, find_vlalign_error, format_report

log = logging.getLogger(__name__)

#: Environment variable that turns on tracebacks for expected failures (``1``, ``true`` or ``yes``).
VERBOSE_ENV_VAR = "VLALIGN_VERBOSE"
#: Environment variable naming the folder of run logs (default: ``data/logs`` in the project).
LOG_DIR_ENV_VAR = "VLALIGN_LOG_DIR"
#: Pipelines with a plan node, and the runner ``kedro run`` uses for them without ``--runner``
#: (:mod:`vlalign_pipelines.runner`); every other pipeline keeps Kedro's SequentialRunner.
PLANNED_PIPELINES = ("retrain",)
PLANNED_RUNNER = "vlalign_pipelines.runner.PlannedRunner"

# ---------------------------------------------------------------------------------------------------------
# Where a failing run was: the node and the dataset being loaded or saved
# ---------------------------------------------------------------------------------------------------------


@dataclass
class RunPosition:
    """The last node and dataset a run touched; read by the failure message."""

    node: str | None = None     # name of the node being run (or whose inputs are being loaded)
    dataset: str | None = None  # catalog name of the dataset being loaded or saved, None between I/O
    action: str | None = None   # "loading" or "saving"

    def describe(self) -> str:
        """``in node `x` (loading dataset `y`)`` or ``""`` when nothing ran yet."""
        text = f"in node `{self.node}`" if self.node else ""
        if self.dataset:
            text += f" ({self.action} dataset `{self.dataset}`)"
        return text.strip()


POSITION = RunPosition()


class RunPositionHook:
    """Keeps :data:`POSITION` up to date during a run (sequential runner; registered in settings.HOOKS)."""

    @hook_impl
    def before_dataset_loaded(self, dataset_name: str, node: Any) -> None:
        POSITION.node, POSITION.dataset, POSITION.action = node.name, dataset_name, "loading"

    @hook_impl
    def after_dataset_loaded(self, dataset_name: str, data: Any, node: Any) -> None:
        POSITION.dataset = POSITION.action = None

    @hook_impl
    def before_node_run(self, node: Any) -> None:
        POSITION.node, POSITION.dataset, POSITION.action = node.name, None, None

    @hook_impl
    def before_dataset_saved(self, dataset_name: str, data: Any, node: Any) -> None:
        POSITION.node, POSITION.dataset, POSITION.action = node.name, dataset_name, "saving"

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any, node: Any) -> None:
        POSITION.dataset = POSITION.action = None


# ---------------------------------------------------------------------------------------------------------
# Which failures are expected, and what to say about them
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Failure:
    """An expected failure, ready to print."""

    kind: str    # the exception class shown to the user, e.g. "ValidationFailedError"
    detail: str  # its message: what failed, the file / entry / field, what was expected, what to do
    hint: str    # one more line on what to do, or ""


_MISSING_INPUTS = re.compile(r"Pipeline input\(s\) \{(?P<names>.*)\} not found in the")


def _kedro_config_failure(exc: BaseException) -> Failure | None:
    """A :class:`Failure` for Kedro's own configuration errors, None for anything else."""
    from kedro.config import BadConfigException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    text = str(exc).strip()
    if isinstance(exc, MissingConfigException):
        return Failure(type(exc).__name__, text, "Check --env and --conf-source, and that the files are there.")
    if isinstance(exc, (BadConfigException, OmegaConfBaseException, YAMLError)):
        return Failure("configuration error", f"{type(exc).__name__}: {text}", "Fix the file or key it names.")
    if isinstance(exc, ValueError):
        missing = _MISSING_INPUTS.search(text)
        if missing:
            names = [n.strip(" '\"") for n in missing.group("names").split(",")]
            params = [n.removeprefix("params:") for n in names if n.startswith("params:")]
            datasets = [n for n in names if not n.startswith("params:")]
            parts = []
            if params:
                parts.append(f"parameter(s) {', '.join(params)} not defined in any conf/*/parameters*.yml")
            if datasets:
                parts.append(f"dataset(s) {', '.join(datasets)} not in the data catalog")
            return Failure(
                "missing configuration",
                "The pipeline needs " + "; ".join(parts) + ".",
                "Define them in conf/base (or your environment), or pass parameters with --params key=value.",
            )
        if text.startswith(("Failed to find the pipeline named", "Pipeline does not contain")):
            return Failure("unknown pipeline or node", text, f"Pipelines: {', '.join(pipeline_names())}.")
    if type(exc) is ImportError:
        # `kedro run --pipeline X` imports vlalign_pipelines.pipelines.X only; a typo in X ends here.
        missing = _missing_pipeline_module(exc)
        if missing:
            return Failure(
                "unknown pipeline", f"there is no pipeline named {missing!r}.",
                f"Pipelines: {', '.join(pipeline_names())}; without --pipelines the default one runs.",
            )
    return None


_PIPELINE_IMPORT = re.compile(r"An error occurred while importing the '(?P<module>[\w.]+)' module")


def _missing_pipeline_module(exc: ImportError) -> str | None:
    """``X`` when ``exc`` is find_pipelines' error for a requested pipeline X that has no package.

    A pipeline package that exists but fails to import (a bug) carries its cause and is not matched.
    """
    found = _PIPELINE_IMPORT.search(str(exc))
    prefix = f"{__package__}.pipelines."
    if exc.__cause__ is not None or not found or not found.group("module").startswith(prefix):
        return None
    name = found.group("module")[len(prefix):]
    return name if name not in pipeline_names() else None


def pipeline_names() -> list[str]:
    """The pipeline packages of this project (``vlalign_pipelines.pipelines.<name>``)."""
    import pkgutil

    from vlalign_pipelines import pipelines

    return sorted(info.name for info in pkgutil.iter_modules(pipelines.__path__) if info.ispkg)


def classify(exc: BaseException) -> Failure | None:
    """A :class:`Failure` when ``exc`` is an expected failure, else None (the traceback is kept)."""
    ours = find_vlalign_error(exc)
    if ours is not None:
        return Failure(type(ours).__name__, str(ours).strip(), "")
    for item in exception_chain(exc):
        failure = _kedro_config_failure(item)
        if failure is not None:
            return failure
    return None


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def format_failure(
    failure: Failure, *, command: str, where: str = "", outputs: str = "", log_file: Path | None = None,
    width: int | None = None,
) -> str:
    """The message printed for an expected failure: at most about 20 lines."""
    footer = []
    if outputs:
        footer.append(f"Outputs of this run: {outputs}")
    if log_file is not None:
        footer.append(f"Full log with the traceback: {_shown(log_file)} (or run again with --verbose)")
    title = f"Error: {command} failed ({failure.kind})" + (f" {where}" if where else "") + ":"
    return format_report(title, failure.detail, hint=failure.hint, footer=tuple(footer), width=width)


# ---------------------------------------------------------------------------------------------------------
# Logging during a run: everything to the log file, failure noise held back from the console
# ---------------------------------------------------------------------------------------------------------


def _is_failure_noise(record: logging.LogRecord) -> bool:
    """Records Kedro and kedro-mlflow emit when a run fails; they repeat what the message says."""
    text = str(record.msg)
    return (
        (record.name.startswith("kedro.pipeline") and "failed with error" in text)
        or (record.name.startswith("kedro.runner") and ("have not run" in text or "No nodes ran" in text))
        or (record.name.startswith("kedro_mlflow") and "because of an error" in text)
    )


class HoldFailureNoise(logging.Filter):
    """Console filter: keeps back failure records, to print them again if the failure is unexpected."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if _is_failure_noise(record):
            self.held.append(record)
            return False
        return True


def _safe_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:64] or "_"


def log_file_path(project_path: Path, env: str, run_name: str) -> Path:
    """``data/logs/<YYYYmmdd-HHMMSS>_<env>_<run_name>.log`` (``$VLALIGN_LOG_DIR`` to change the folder).

    Falls back to the system temporary folder when the folder cannot be created (read-only checkout).
    """
    folder = Path(os.environ.get(LOG_DIR_ENV_VAR) or project_path / "data" / "logs")
    name = f"{time.strftime('%Y%m%d-%H%M%S')}_{_safe_part(env)}_{_safe_part(run_name)}.log"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / name
        probe.touch()
        return probe
    except OSError:
        fallback = Path(tempfile.gettempdir()) / "vlalign-logs"
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback / name


class RunLog:
    """Attaches a file handler to the root logger and a :class:`HoldFailureNoise` filter to the console."""

    def __init__(self, path: Path, quiet_console: bool) -> None:
        self.path = path
        self.handler = logging.FileHandler(path, encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
        self.noise = HoldFailureNoise()
        self.quiet_console = quiet_console
        self.console: list[logging.Handler] = []

    def __enter__(self) -> RunLog:
        root = logging.getLogger()
        self.console = list(root.handlers)
        if self.quiet_console:
            for handler in self.console:
                handler.addFilter(self.noise)
        root.addHandler(self.handler)
        return self

    def write_traceback(self, exc: BaseException) -> None:
        """The full traceback, into the log file only."""
        self.handler.emit(logging.LogRecord(
            __name__, logging.ERROR, __file__, 0, "The run failed:", None, (type(exc), exc, exc.__traceback__)
        ))

    def release_held(self) -> None:
        """Print the held failure records on the console after all (for unexpected failures)."""
        for record in self.noise.held:
            for handler in self.console:
                if record.levelno >= handler.level:
                    handler.emit(record)
        self.noise.held.clear()

    def __exit__(self, *exc: object) -> None:
        root = logging.getLogger()
        root.removeHandler(self.handler)
        self.handler.close()
        for handler in self.console:
            handler.removeFilter(self.noise)


# ---------------------------------------------------------------------------------------------------------
# The run command
# ---------------------------------------------------------------------------------------------------------


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _project_path() -> Path:
    from kedro.utils import find_kedro_project

    context = click.get_current_context(silent=True)  # under `kedro`, its obj is the ProjectMetadata
    project_path = getattr(getattr(context, "obj", None), "project_path", None)
    return Path(project_path or find_kedro_project(Path.cwd()) or Path.cwd())


def check_environment(conf_root: Path, env: str) -> None:
    """A :class:`ConfigError` naming the environments there are, when ``conf_root/env`` is not a folder."""
    if not conf_root.is_dir() or (conf_root / env).is_dir():
        return
    found = sorted(p.name for p in conf_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    try:
        folder = (conf_root / env).resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        folder = conf_root / env
    raise ConfigError(
        f"environment {env!r} not found: there is no folder {folder}/. Environments here: "
        f"{', '.join(found)}. Use one of them with --env (or KEDRO_ENV), or create {folder}/ holding "
        "only the files and keys that differ from conf/base."
    )


def process_mode(conf_root: Path, env: str, params: dict[str, Any]) -> str:
    """The reproducibility mode of a ``kedro run`` process: ``training.stage_defaults.reproducibility`` of the
    environment's parameters with ``--params`` applied. Evaluation and every stage that does not set its own mode
    compute in it (read from the configuration files alone: nothing here imports torch)."""
    from kedro.framework.project import settings

    loader = settings.CONFIG_LOADER_CLASS(str(conf_root), env=env, runtime_params=params,
                                          **settings.CONFIG_LOADER_ARGS)
    defaults = ((loader["parameters"].get("training") or {}).get("stage_defaults") or {})
    return reproducibility.check_mode(defaults.get("reproducibility", reproducibility.DEFAULT_MODE),
                                      "training.stage_defaults.reproducibility")


def guarded_run(
    body: Callable[[], Any], *, command: str, run_log: RunLog, verbose: bool,
    outputs: Callable[[], str] = lambda: "",
) -> Any:
    """Run ``body``; an expected failure becomes a short message on stderr and exit status 1.

    ``outputs`` returns the run's output folder for the message (known once ``body`` has started).

    The traceback of any failure goes to ``run_log``'s file; unexpected failures are re-raised unchanged
    (after the console gets the records that were held back).
    """
    try:
        return body()
    except click.exceptions.ClickException:
        raise  # usage errors: click prints them itself
    except Exception as exc:
        run_log.write_traceback(exc)
        failure = classify(exc)
        if failure is None:
            run_log.release_held()
            raise
        if verbose:
            run_log.release_held()
            traceback.print_exception(exc, file=sys.stderr)
        message = format_failure(
            failure, command=command, where=POSITION.describe(), outputs=outputs(), log_file=run_log.path
        )
        click.echo(click.style(message, fg="red"), err=True)
        log.debug("expected failure reported to the user:\n%s", message)
        raise SystemExit(1) from None


def _run(verbose: bool, **kwargs: Any) -> Any:
    from vlalign_pipelines.settings import (
        CONFIG_LOADER_ARGS, RUN_NAME_ENV_VAR, check_name, run_location, run_name_from,
    )
    from kedro.framework.project import settings

    from vlalign_pipelines.recipes import RECIPE_ENV_VAR, recipe_from

    verbose = verbose or _truthy(os.environ.get(VERBOSE_ENV_VAR))
    project_path = _project_path()
    env = kwargs.get("env") or os.environ.get("KEDRO_ENV") or CONFIG_LOADER_ARGS["default_run_env"]
    params = kwargs.get("params") or {}
    run_name = run_name_from(params) if not params.get("run_name") else str(params["run_name"])
    command = "kedro run"

    with RunLog(log_file_path(project_path, env, run_name), quiet_console=not verbose) as run_log:
        outputs = ""

        def prepare_and_run() -> Any:
            nonlocal outputs
            check_name(env, "environment")
            # The pipeline registry runs inside the session and reads these (training stage list, run dir).
            os.environ["KEDRO_ENV"] = env
            recipe = recipe_from(params)
            if recipe:  # the pipeline's shape (its stages) depends on the recipe
                os.environ[RECIPE_ENV_VAR] = recipe
            os.environ[RUN_NAME_ENV_VAR] = run_name_from(params)
            location = run_location(env, os.environ[RUN_NAME_ENV_VAR])
            conf_source = kwargs.get("conf_source")
            check_environment(Path(conf_source) if conf_source else project_path / settings.CONF_SOURCE, env)
            outputs = f"{location.run_dir}/ (environment `{location.env}`, run name `{location.run_name}`)"
            POSITION.node = POSITION.dataset = POSITION.action = None
            log.info("Outputs go to %s; the full log is in %s", outputs, run_log.path)
            # The numeric libraries read their pinning when they load: set it before anything imports torch.
            mode = process_mode(Path(conf_source) if conf_source else project_path / settings.CONF_SOURCE, env, params)
            reproducibility.activate(mode)
            log.info("Numerics: reproducibility=%s for this process (training.stage_defaults.reproducibility); a stage "
                     "that sets another mode runs in its own process", mode)
            # The retrain pipeline's plan node may end the run early; that needs PlannedRunner (a SequentialRunner).
            requested = {kwargs.get("pipeline"), *(kwargs.get("pipelines") or [])}
            if not kwargs.get("runner") and requested & set(PLANNED_PIPELINES):
                kwargs["runner"] = PLANNED_RUNNER
            return kedro_run.callback(**kwargs)

        return guarded_run(prepare_and_run, command=command, run_log=run_log, verbose=verbose, outputs=lambda: outputs)


@click.group(name="vlalign")
def cli() -> None:
    """vlalign project commands."""


run = click.Command(
    name="run",
    callback=_run,
    params=[
        *kedro_run.params,
        click.Option(
            ["--verbose"], is_flag=True, default=False,
            help=f"On an expected failure, print the traceback too (also: {VERBOSE_ENV_VAR}=1).",
        ),
    ],
    help=(kedro_run.help or "Run the pipeline.")
    + "\n\nvlalign: expected failures (bad data, missing files, invalid parameters or environment) print a "
    "short message and exit with status 1; the full log, tracebacks included, is written to data/logs/.",
    context_settings=CONTEXT_SETTINGS,
)
cli.add_command(run)
