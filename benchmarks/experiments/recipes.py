"""Every recipe shipped in conf/ with its default schedule, as a new user runs it: ``kedro run --params
training.recipe=<name>`` on the built-in dataset, then its test-split metrics beside chance.

With ``--run`` each recipe not yet recorded at this commit runs as its own ``kedro run`` (about 10 minutes each on 2
cores; ``blip`` and ``sphinx`` longer), one after another; without it the script only collects the metrics of the
runs already in the run folders (``data/runs/local/<recipe>``, the default recipe in ``data``). Writes
``docs/recipes/recipes.json``: per recipe the commit, the retrieval mean recall (English and Chinese), its ratio to
chance, the ITM re-ranked mean recall where the model has an ITM head, zero-shot top-1, and the pipeline's wall time.

    .venv/bin/python benchmarks/experiments/recipes.py --run            # all recipes, resumable
    .venv/bin/python benchmarks/experiments/recipes.py --recipes daa --run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

OUT = common.RESULTS / "recipes.json"


def run_folder(recipe: str) -> Path:
    return common.ROOT / ("data" if recipe == "clip" else f"data/runs/local/{recipe}")


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=common.ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()


def dirty() -> bool:
    return bool(subprocess.run(["git", "status", "--porcelain", "--", "src", "conf"], cwd=common.ROOT,
                               capture_output=True, text=True, check=True).stdout.strip())


def collect(recipe: str) -> dict | None:
    """The recipe's metrics from its run folder's 08_reporting/metrics.json, None when it has not run."""
    path = run_folder(recipe) / "08_reporting" / "metrics.json"
    if not path.exists():
        return None
    metrics = json.loads(path.read_text(encoding="utf-8"))
    out = {}
    for block in ("retrieval", "retrieval_zh", "itm_rerank"):
        if block in metrics:
            out[block] = {"mean_recall": metrics[block]["metrics"]["mean_recall"],
                          "chance": metrics[block]["chance"]["mean_recall"],
                          "x_chance": metrics[block]["metrics"]["mean_recall"] / metrics[block]["chance"]["mean_recall"]}
    if "zero_shot" in metrics:
        out["zero_shot"] = {"top1": metrics["zero_shot"]["metrics"]["acc1"],
                            "x_chance": metrics["zero_shot"]["metrics"]["acc1"] / metrics["zero_shot"]["chance"]["acc1"]}
    capfilt = run_folder(recipe) / "08_reporting" / "capfilt" / "capfilt_report.json"
    if capfilt.exists():
        report = json.loads(capfilt.read_text(encoding="utf-8"))
        out["capfilt"] = {"threshold": report["threshold"], "images_without_caption": report["images_without_caption"],
                          "images_rescued": report.get("images_rescued", 0),
                          "original_kept": report["per_origin"]["original"]["kept_fraction"],
                          "synthetic_kept": report["per_origin"]["synthetic"]["kept_fraction"]}
    return out


def main(argv: list[str] | None = None) -> int:
    _, training = common.training_conf()
    names = list(training["recipes"])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=names, choices=names)
    parser.add_argument("--run", action="store_true", help="run each recipe not yet recorded at this commit")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--params", default="", help="more `kedro run --params` (e.g. training.stage_defaults."
                        "reproducibility=native): recorded beside the results; the schedule stays the recipe's")
    args = parser.parse_args(argv)
    out = Path(args.out)
    state = json.loads(out.read_text(encoding="utf-8")) if out.exists() else {"recipes": {}}
    head = commit() + ("+dirty" if dirty() else "")
    for recipe in args.recipes:
        recorded = state["recipes"].get(recipe)
        if args.run and not (recorded and recorded["commit"] == head):
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "KEDRO_DISABLE_TELEMETRY": "true",
                   "MPLBACKEND": "Agg"}
            start = time.perf_counter()
            log = out.parent / "logs" / f"{recipe}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("w", encoding="utf-8") as fh:
                params = ",".join([f"training.recipe={recipe}", *filter(None, [args.params])])
                done = subprocess.run([str(Path(sys.executable).with_name("kedro")), "run", "--params", params],
                                      cwd=common.ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
            if done.returncode:
                print(f"{recipe}: kedro run failed ({done.returncode}); see {log}", file=sys.stderr)
                continue
            metrics = collect(recipe)
            state["recipes"][recipe] = {"commit": head, "pipeline_wall_s": time.perf_counter() - start,
                                        "params": params, "threads": os.environ.get("OMP_NUM_THREADS", "default"),
                                        "description": training["recipes"][recipe].get("description", ""), **metrics}
            out.write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
    for recipe, row in state["recipes"].items():
        r = row.get("retrieval", {})
        print(f"{recipe:12s} {row['commit']:>20s} mean recall {r.get('mean_recall', float('nan')):.3f} "
              f"({r.get('x_chance', float('nan')):.1f}x chance)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
