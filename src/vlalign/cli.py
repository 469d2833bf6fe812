"""The ``vlalign`` command: library tasks that do not need Kedro.

The pipelines themselves run with ``kedro run`` (see the README).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_demo(args: argparse.Namespace) -> int:
    from vlalign.data.demo import DemoConfig, generate_demo_dataset

    overrides = json.loads(args.config) if args.config else {}
    root = generate_demo_dataset(Path(args.root), DemoConfig(**overrides))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlalign",
        description="vlalign library commands. Run the pipelines with `kedro run` (see README.md).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="generate the built-in default dataset (offline, seeded, idempotent)")
    demo.add_argument("--root", default="data/01_raw/demo", help="where to write it (default: %(default)s)")
    demo.add_argument("--config", default=None, help='JSON overrides of DemoConfig, e.g. \'{"n_train": 200}\'')
    demo.set_defaults(func=_cmd_demo)

    models = sub.add_parser("models", help="list the named model configs")
    models.add_argument("-v", "--verbose", action="store_true", help="print each config in full")
    models.set_defaults(func=_cmd_models)

    ckpt = sub.add_parser("checkpoint", help="describe a checkpoint file (config, step, merge info)")
    ckpt.add_argument("path", help="path to a .pt checkpoint written by vlalign")
    ckpt.set_defaults(func=_cmd_checkpoint)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
