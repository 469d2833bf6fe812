"""The ``vlalign`` command: library tasks that do not need Kedro.

The pipelines themselves run with ``kedro run`` (see the README).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from vlalign.errors import ConfigError, find_vlalign_error, format_report

#: ``vlalign audit --retrain-tolerance`` default (vlalign.tracking.audit.DEFAULT_RETRAIN_TOLERANCE; no torch here).
DEFAULT_RETRAIN_TOLERANCE = 0.05

#: Environment variable that turns on tracebacks for expected failures (``1``, ``true`` or ``yes``).
VERBOSE_ENV_VAR = "VLALIGN_VERBOSE"
#: Environment variable naming the folder of failure logs (default: ``<tmp>/vlalign-logs``).
LOG_DIR_ENV_VAR = "VLALIGN_LOG_DIR"


def _cmd_demo(args: argparse.Namespace) -> int:
    from vlalign.data.demo import DemoConfig, generate_demo_dataset

    try:
        overrides = json.loads(args.config) if args.config else {}
    except ValueError as exc:
        raise ConfigError(f"vlalign demo --config: not JSON ({exc}); e.g. '{{\"noise_fraction\": 0.2}}'.") from None
    root = generate_demo_dataset(Path(args.root), DemoConfig.from_mapping(overrides, "vlalign demo --config"))
    print(f"default dataset ready at {root}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from vlalign.models import get_model_config, list_models

    for name in list_models():
        cfg = get_model_config(name)
        if args.verbose:
            print(json.dumps({name: cfg.to_dict()}, indent=2))
        else:
            print(name)
    return 0


def _cmd_checkpoint(args: argparse.Namespace) -> int:
    from vlalign.train import load_checkpoint

    ckpt = load_checkpoint(Path(args.path))
    summary = {k: ckpt.get(k) for k in ("format", "step", "epoch", "total_steps", "completed")}
    summary["stage_config"] = ckpt.get("stage_config")
    summary["model_config"] = ckpt.get("model_config")
    summary["merge"] = ckpt.get("merge")
    summary["parameters"] = int(sum(t.numel() for t in ckpt["model"].values()))
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from vlalign.train.run import run_stage, spec_from_args

    final = run_stage(spec_from_args(args))
    print(f"stage finished: {final}")
    return 0


def _cmd_shard(args: argparse.Namespace) -> int:
    import pandas as pd

    from vlalign.data.shards import write_shards

    index = write_shards(pd.read_parquet(args.manifest), args.out, split=args.split, max_samples=args.max_samples,
                         max_bytes=args.max_mib << 20, seed=args.seed)
    print(f"{index.n_samples} samples in {len(index.shards)} shards at {args.out}")
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from vlalign.tracking.audit import AuditConfig, run_audit

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per check, no progress bars
    if not os.environ.get("MLFLOW_TRACKING_URI"):  # the project's store, as `kedro run` uses it
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{(Path(args.repo) / 'mlflow.db').resolve()}"
    config = AuditConfig(model_uri=args.model_uri, repo=args.repo, retrain=args.retrain, tolerance=args.tolerance,
                         retrain_tolerance=args.retrain_tolerance, work_dir=args.work_dir,
                         log_to_registry=not args.no_log)
    report = run_audit(config, out_dir=args.out)
    print("\n".join(report.lines()))
    if args.out:
        print(f"report: {Path(args.out) / 'audit.md'} and {Path(args.out) / 'audit.json'}")
    if config.log_to_registry:
        print(f"logged to {report.name} v{report.version}: tags audit.*, artifacts audit/ of run {report.run_id}")
    return 0 if report.passed else 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlalign",
        description="vlalign library commands. Run the pipelines with `kedro run` (see README.md).",
    )
    parser.add_argument(
        "--verbose", dest="show_traceback", action="store_true",
        help=f"on an expected failure, print the traceback too (also: {VERBOSE_ENV_VAR}=1); "
        "give it before the command, e.g. `vlalign --verbose checkpoint x.pt`",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="generate the built-in default dataset (offline, seeded, idempotent)")
    demo.add_argument("--root", default="data/01_raw/demo", help="where to write it (default: %(default)s)")
    demo.add_argument("--config", default=None, help='JSON overrides of DemoConfig, e.g. \'{"n_train": 200}\'')
    demo.set_defaults(func=_cmd_demo)

    models = sub.add_parser("models", help="list the named model configs")
    models.add_argument("-v", "--verbose", action="store_true", help="print each config in full")
    models.set_defaults(func=_cmd_models)

    train = sub.add_parser(
        "train", help="run one training stage from files (what the Kedro node, torchrun and Kubernetes pods run)",
        description="Run one training stage. Single process: `vlalign train --spec data/06_models/stage1/spec.json`. "
        "Several processes: `torchrun --nproc-per-node 2 -m vlalign train --spec FILE` (gloo on CPU, NCCL on GPUs). "
        "Re-running the same command resumes from the last checkpoint, or returns at once when final.pt is complete.",
    )
    from vlalign.train.run import add_train_arguments

    add_train_arguments(train)
    train.set_defaults(func=_cmd_train)

    shard = sub.add_parser("shard", help="write a clean manifest's split as WebDataset-style tar shards (streamed training)")
    shard.add_argument("manifest", help="clean manifest parquet (e.g. data/03_primary/clean_manifest.parquet)")
    shard.add_argument("--out", required=True, help="output folder: <split>-NNNNN-<sha>.tar shards and shards.json")
    shard.add_argument("--split", default="train", help="manifest split to write (default: %(default)s)")
    shard.add_argument("--max-samples", type=int, default=1000, help="images per shard at most (default: %(default)s)")
    shard.add_argument("--max-mib", type=int, default=256, help="shard size in MiB at most (default: %(default)s)")
    shard.add_argument("--seed", type=int, default=0, help="seed of the one-off shuffle before sharding")
    shard.set_defaults(func=_cmd_shard)

    sub.add_parser("loss-bench", add_help=False,  # parsed by vlalign.losses.bench.main (see main below)
                   help="time one fwd+bwd of a contrastive loss at a batch size N, print time and peak memory as JSON "
                   "(vlalign loss-bench --n N --d D --loss clip|siglip|weighted_clip --impl naive|tiled|triton "
                   "--device cpu|cuda)")

    audit = sub.add_parser(
        "audit", help="check that a registered model version is what its lineage says (commit, code, data, weights, "
        "metrics; --retrain: weights bit for bit)",
        description="Audit a registered model version: the recorded commit exists; the code here is the recorded code; "
        "every recorded input has its recorded DVC hash (in the work tree, else in the DVC cache or pulled from the "
        "remote into a temporary folder); the registered weights have the recorded hash; evaluating them on the "
        "recorded data reproduces the registered metrics within --tolerance; with --retrain, every stage retrained "
        "on CPU from its recorded spec, in its recorded reproducibility mode, reproduces the recorded weight hashes bit "
        "for bit (where this machine cannot promise that, e.g. a native run recorded on other kernels, the difference "
        "is named and retrain:metrics-within-tolerance compares metrics instead). Prints one line per check, "
        "logs the report to the version (tags audit.*, artifacts audit/ of its run) and exits 2 when a check fails. "
        "MLFLOW_TRACKING_URI names the registry (default for a project: sqlite:///$PWD/mlflow.db).",
    )
    audit.add_argument("model_uri", help="models:/<name>/<version> or models:/<name>@<alias>, e.g. models:/<name>@champion")
    audit.add_argument("--retrain", action="store_true", help="also retrain every stage on CPU (slow) and compare weights")
    audit.add_argument("--repo", default=".", help="the project's git work tree / DVC repository (default: %(default)s)")
    audit.add_argument("--tolerance", type=float, default=1e-6, help="largest |recorded - recomputed| per metric "
                       "(default: %(default)g)")
    audit.add_argument("--retrain-tolerance", type=float, default=DEFAULT_RETRAIN_TOLERANCE,
                       help="where this machine cannot promise the recorded bits (a GPU run, or a native run on other "
                       "kernels), the retrained model's metrics must match the registered ones within this absolute "
                       "difference, reported as retrain:metrics-within-tolerance (default: %(default)g)")
    audit.add_argument("--out", default=None, help="also write audit.md and audit.json into this folder")
    audit.add_argument("--work-dir", default=None, help="keep downloads, restored data and retrained stages here "
                       "(default: a temporary folder, removed afterwards)")
    audit.add_argument("--no-log", action="store_true", help="do not log the report to the model version")
    audit.set_defaults(func=_cmd_audit)

    ckpt = sub.add_parser("checkpoint", help="describe a checkpoint file (config, step, merge info)")
    ckpt.add_argument("path", help="path to a .pt checkpoint written by vlalign")
    ckpt.set_defaults(func=_cmd_checkpoint)
    return parser


def _write_traceback(exc: BaseException, command: str) -> Path | None:
    """The traceback of ``exc`` in ``$VLALIGN_LOG_DIR`` (default ``<tmp>/vlalign-logs``); None if unwritable."""
    folder = Path(os.environ.get(LOG_DIR_ENV_VAR) or Path(tempfile.gettempdir()) / "vlalign-logs")
    path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}_vlalign-{command}_{os.getpid()}.log"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(f"vlalign {' '.join(sys.argv[1:])}\n\n" + "".join(traceback.format_exception(exc)),
                        encoding="utf-8")
    except OSError:
        return None
    return path


def _activate_reproducibility(argv: list[str]) -> None:
    """Pin the numeric libraries before anything imports torch: ``vlalign train`` in its stage's mode (its --spec or
    --stage file and --set-stage overrides), every other command in ``$VLALIGN_REPRODUCIBILITY`` (default portable).
    torchrun ranks and Kubernetes pods run ``vlalign train`` too, so each of them pins itself the same way."""
    from vlalign import reproducibility

    mode, threads = os.environ.get(reproducibility.MODE_ENV) or reproducibility.DEFAULT_MODE, None
    commands = [a for a in argv if not a.startswith("-")]
    if commands[:1] == ["train"]:
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--spec")
        pre.add_argument("--stage")
        pre.add_argument("--set-stage", action="append", default=[])
        known, _ = pre.parse_known_args(argv[argv.index("train") + 1:])
        mode, threads = reproducibility.spec_mode(_raw_stage(known.spec, known.stage), known.set_stage)
    try:
        reproducibility.activate(mode, threads)
    except Exception as exc:  # a bad mode in the file: reported like any other expected failure
        ours = find_vlalign_error(exc)
        if ours is None:
            raise
        print(format_report("Error: vlalign failed before it started:", str(ours).strip()), file=sys.stderr)
        raise SystemExit(1) from None


def _raw_stage(spec: str | None, stage: str | None) -> dict:
    """The stage fields of ``vlalign train``'s --spec or --stage file, read as plain JSON/YAML (no torch)."""
    import yaml

    path = spec or stage
    if not path or not Path(path).is_file():
        return {}  # spec_from_args reports the missing file
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}  # JSON is YAML
    except yaml.YAMLError:
        return {}  # spec_from_args reports the broken file
    if not isinstance(loaded, dict):
        return {}
    return {"stage": loaded.get("stage") or {}} if spec else {"stage": loaded}


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. An expected failure (a ``VLAlignError``) prints a short message and returns 1;
    any other error keeps its traceback."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["loss-bench"]:  # its own parser: every option goes through (argparse's REMAINDER would not)
        from vlalign.losses.bench import main as bench_main

        return bench_main(argv[1:])
    _activate_reproducibility(argv)  # before build_parser: the train options' module loads torch
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:
        ours = find_vlalign_error(exc)
        if ours is None:
            raise
        verbose = args.show_traceback or os.environ.get(VERBOSE_ENV_VAR, "").lower() in ("1", "true", "yes", "on")
        if verbose:
            traceback.print_exception(exc, file=sys.stderr)
        log_file = _write_traceback(exc, args.command)
        footer = (f"Full traceback: {log_file} (or run again as `vlalign --verbose {args.command} ...`)",) if log_file else ()
        title = f"Error: vlalign {args.command} failed ({type(ours).__name__}):"
        print(format_report(title, str(ours).strip(), footer=footer), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
