"""``vlalign train``: run one stage from files. The Kedro training node, ``torchrun -m vlalign train`` and a
Kubernetes pod all call :func:`run_stage`; only where the spec's paths point differs.

Inputs are files: the resolved model and stage configs (a :class:`~vlalign.train.spec.TrainSpec`), the training
data (a clean manifest ``.parquet`` or a shard index, local or an fsspec URL), an optional initial checkpoint.
Outputs are files in the stage folder: ``spec.json``, ``checkpoints/`` (resumable), and ``final.pt`` written once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from vlalign import reproducibility
from vlalign.distributed.context import init_from_env
from vlalign.errors import ConfigError, DatasetFormatError, VLAlignError
from vlalign.models.config import ModelConfig
from vlalign.train.checkpoint import CheckpointStore, load_checkpoint
from vlalign.train.config import StageConfig
from vlalign.train.loop import TrainCallback, train_stage
from vlalign.train.runtime import resolve_device
from vlalign.train.spec import TrainSpec

log = logging.getLogger(__name__)


def load_train_data(location: str) -> Any:
    """A clean manifest (``*.parquet``) as a DataFrame, or a shard index (``shards.json``, its folder, or an fsspec
    URL of either) as a :class:`vlalign.data.shards.ShardIndex`."""
    if location.endswith(".parquet"):
        if not Path(location).is_file():
            raise DatasetFormatError(f"{location}: training manifest not found; run validation first or fix --data.")
        return pd.read_parquet(location)
    from vlalign.data.shards import ShardIndex

    return ShardIndex.load(location)


def run_stage(spec: TrainSpec, callbacks: Sequence[TrainCallback] = ()) -> Path:
    """Train the stage described by ``spec`` (in this process, or as one rank of a torchrun job) and return the
    path of its ``final.pt``. Rank 0 writes ``spec.json``, the checkpoints and the MLflow run (a child of
    ``spec.mlflow["parent_run_id"]`` when given); every rank resumes from the same checkpoint."""
    model_cfg = ModelConfig.from_dict(spec.model)
    stage = StageConfig.from_dict(spec.stage)
    if not reproducibility.in_force(stage.reproducibility, stage.cpu_threads):
        raise ConfigError(
            f"stage {stage.name!r}: reproducibility={stage.reproducibility} is not in force in this process (it runs "
            f"{reproducibility.current_mode() or 'native, unpinned'}). Run it as `vlalign train --spec FILE` (which "
            f"applies the mode before loading torch), or call vlalign.reproducibility.activate("
            f"'{stage.reproducibility}') before importing torch.")
    dist = init_from_env(resolve_device(stage.device).type)
    store = CheckpointStore(spec.out_dir)
    if dist.is_main:
        target = Path(spec.out_dir) / "spec.json"
        if not target.exists() or TrainSpec.load(target).to_dict() != spec.to_dict():
            spec.save(target)
    data = load_train_data(spec.data)
    init = load_checkpoint(spec.init) if spec.init else None
    logger: Any = contextlib.nullcontext()
    extra: list[TrainCallback] = []
    if dist.is_main and spec.mlflow:
        from vlalign.tracking.mlflow import StageRunLogger

        numerics = reproducibility.describe(resolve_device(stage.device, dist.local_rank))
        logger = StageRunLogger(stage.name, params={"model": model_cfg.to_dict(), "stage": stage.to_dict(),
                                                    "data": spec.data, "world_size": dist.world_size,
                                                    "numerics": numerics},
                                parent_run_id=spec.mlflow.get("parent_run_id"),
                                experiment_id=spec.mlflow.get("experiment_id"),
                                tracking_uri=spec.mlflow.get("tracking_uri"), force=True)
        extra.append(logger)
    try:
        with logger:
            train_stage(model_cfg, stage, data, init, store, callbacks=[*callbacks, *extra], dist=dist)
    except BaseException as exc:
        if dist.distributed:  # torchrun then tears the job down; say which rank started it
            print(f"vlalign train: rank {dist.rank}/{dist.world_size} failed: {type(exc).__name__}: {exc}",
                  file=sys.stderr, flush=True)
        raise
    return store.final_path


def run_stage_in_subprocess(spec: TrainSpec) -> Path:
    """Run the stage as ``python -m vlalign train --spec <out_dir>/spec.json`` in a new process, which starts in the
    stage's reproducibility mode (a process's numeric libraries are pinned once, when they load). Output streams
    through; a failure raises with the command to re-run it."""
    import subprocess

    target = Path(spec.out_dir) / "spec.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    spec.save(target)
    command = [sys.executable, "-m", "vlalign", "train", "--spec", str(target)]
    log.info("stage %r runs in its own process (reproducibility=%s): %s", spec.stage.get("name"),
             spec.stage.get("reproducibility"), " ".join(command))
    env = reproducibility.child_environment(spec.stage["reproducibility"], spec.stage.get("cpu_threads"))
    result = subprocess.run(command, env=env, check=False)
    if result.returncode != 0:
        raise VLAlignError(f"stage {spec.stage.get('name')!r} failed in its own process (exit {result.returncode}); "
                          f"its output is above. Re-run it alone with: {' '.join(command)}")
    return CheckpointStore(spec.out_dir).final_path


def _parse_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], where: str) -> dict[str, Any]:
    """``data`` with ``key.sub=value`` overrides applied (values parsed as YAML: ``lr=0.01``, ``trainable=[all]``)."""
    data = dict(data)
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"{where} override {item!r}: expected key=value, e.g. lr=0.0005 or image.image_size=64.")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node[part] = dict(node.get(part) or {})
            node = node[part]
        node[leaf] = _parse_value(value)
    return data


def spec_from_args(args: Any) -> TrainSpec:
    """The TrainSpec of ``vlalign train``'s arguments: ``--spec FILE``, or the model/stage/data/out flags."""
    import yaml

    from vlalign.models.config import get_model_config

    if args.spec:  # the spec, with any flag given on top (e.g. the same stage into another folder)
        spec = TrainSpec.load(args.spec)
        spec.stage = StageConfig.from_dict(apply_overrides(spec.stage, args.set_stage, "--set-stage")).to_dict()
        spec.model = ModelConfig.from_dict(apply_overrides(spec.model, args.set_model, "--set-model")).to_dict()
        spec.data = args.data or spec.data
        spec.init = args.init or spec.init
        spec.out_dir = args.out or spec.out_dir
        return spec
    missing = [flag for flag, value in (("--stage", args.stage), ("--data", args.data), ("--out", args.out))
               if not value]
    if missing:
        raise ConfigError(f"vlalign train: give --spec FILE, or all of --stage, --data and --out (missing {missing}).")

    def read_yaml(path: str, what: str) -> dict[str, Any]:
        if not Path(path).is_file():
            raise ConfigError(f"{path}: {what} file not found.")
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of {what} fields, got {type(loaded).__name__}.")
        return loaded

    if args.model and (args.model.endswith((".yaml", ".yml", ".json")) or os.sep in args.model):
        model = ModelConfig.from_dict(read_yaml(args.model, "model config")).to_dict()
    else:
        model = get_model_config(args.model or "tiny-vit-bert").to_dict()
    stage = read_yaml(args.stage, "stage config")
    model = apply_overrides(model, args.set_model, "--set-model")
    stage = apply_overrides(stage, args.set_stage, "--set-stage")
    return TrainSpec(model=ModelConfig.from_dict(model).to_dict(), stage=StageConfig.from_dict(stage).to_dict(),
                     data=args.data, out_dir=args.out, init=args.init)


def add_train_arguments(parser: Any) -> None:
    """The options of ``vlalign train`` (documented for ``--help``)."""
    parser.add_argument("--spec", help="a train spec JSON (vlalign.train.spec.TrainSpec: model, stage, data, out_dir, "
                        "init, mlflow). The Kedro training node writes one per stage as <stage folder>/spec.json; "
                        "torchrun and Kubernetes pods run exactly that file. With --spec, --data, --init, --out and "
                        "the --set-* overrides apply on top of it; --model and --stage are not used.")
    parser.add_argument("--model", help="a named model config (`vlalign models`, default tiny-vit-bert) or a "
                        "model-config YAML/JSON file (the fields of vlalign.models.ModelConfig)")
    parser.add_argument("--stage", help="a stage-config YAML/JSON file: the fields of vlalign.train.StageConfig "
                        "(name, trainable, objective, objective_options, epochs or max_steps, batch_size, lr, ..., "
                        "device, precision, compile, accumulate); one element of training.stages")
    parser.add_argument("--data", help="the training data: a clean manifest (data/03_primary/clean_manifest.parquet, "
                        "cached in RAM) or a shard index written by `vlalign shard` (shards.json, its folder, or an "
                        "fsspec URL such as s3://bucket/shards/train; streamed)")
    parser.add_argument("--init", help="initial weights: a checkpoint file, e.g. the previous stage's final.pt")
    parser.add_argument("--out", help="the stage folder: spec.json, checkpoints/ (resumable: re-running resumes), and "
                        "final.pt (written once at the end)")
    parser.add_argument("--set-stage", action="append", default=[], metavar="KEY=VALUE",
                        help="override a stage field (repeatable), e.g. --set-stage max_steps=20 --set-stage precision=bf16")
    parser.add_argument("--set-model", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model field (repeatable), e.g. --set-model text.num_layers=1")
