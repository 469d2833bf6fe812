"""Batch size: `siglip` vs `clip` at global batch 8, 16, 32, 64 and 128, with the same number of examples seen.

The SigLIP paper reports the pairwise sigmoid loss ahead of the softmax (InfoNCE) at small batches, the two meeting
as the batch grows. Both recipes run as shipped (conf/base/parameters_training.yml) on the built-in data (English),
each arm at each batch size B for ``--examples`` / B optimizer steps of the stage that trains everything and
``--frozen-examples`` / B of the frozen-tower stage, with the recipe's own learning rate and schedule (the same for
both arms: no arm is tuned alone). Retrieval is scored on the test split; the wall time of each run is recorded.

    .venv/bin/python benchmarks/experiments/batch_size.py            # resumable; about 30 min on 2 cores
    .venv/bin/python benchmarks/experiments/batch_size.py --plot-only
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

RECIPES = ("clip", "siglip")
#: Arms: a shipped recipe, or one with a model change. ``siglip_prior``: SigLIP with its bias started at the log prior
#: odds of a positive pair at this batch, -log(B - 1), as the paper's b = -10 is for its 32k batch ("training starts
#: close to the prior"); at B = 8, b = -10 leaves the positive pairs' sigmoid near 0 for hundreds of steps.
ARMS = {"clip": ("clip", None), "siglip": ("siglip", None), "siglip_prior": ("siglip", "prior")}


def run(spec: dict, args) -> dict:
    data = common.corpus("default", args.data_root)
    batch = spec["batch_size"]
    budget = common.Budget(steps=max(args.examples // batch, 1), frozen_steps=max(args.frozen_examples // batch, 1),
                           batch_size=batch, seed=spec["seed"])
    recipe, change = ARMS[spec["recipe"]]
    if change == "prior":
        budget.model_overrides = {"init_logit_bias": -math.log(batch - 1)}
    trained = common.train_recipe(recipe, budget, data)
    return {"metrics": common.evaluate(trained.checkpoint, data, "en", zero_shot=True),
            "steps": budget.steps, "train_wall_s": sum(trained.stage_wall_s.values())}


def summarise(runs: dict) -> dict:
    rows = []
    for batch in sorted({r["spec"]["batch_size"] for r in runs.values()}):
        for recipe in ARMS:
            items = [r for r in runs.values() if r["spec"]["batch_size"] == batch and r["spec"]["recipe"] == recipe]
            if items:
                rows.append({"batch_size": batch, "recipe": recipe, "steps": items[0]["steps"],
                             "seeds": [r["spec"]["seed"] for r in items],
                             **{k: common.interval(r["metrics"][k] for r in items)
                                for k in ("mean_recall", "x_chance", "zero_shot_top1")},
                             "train_wall_s": common.interval(r["train_wall_s"] for r in items)})
    # the paired difference siglip - clip per batch size and seed (same seed, same data order)
    diffs = []
    for batch in sorted({r["batch_size"] for r in rows}):
        entry = {"batch_size": batch}
        for arm in ("siglip", "siglip_prior"):
            pairs = [(a["metrics"]["mean_recall"], b["metrics"]["mean_recall"])
                     for a in runs.values() for b in runs.values()
                     if a["spec"]["batch_size"] == b["spec"]["batch_size"] == batch
                     and a["spec"]["seed"] == b["spec"]["seed"] and a["spec"]["recipe"] == arm
                     and b["spec"]["recipe"] == "clip"]
            if pairs:
                entry[f"{arm}_minus_clip"] = common.interval(s - c for s, c in pairs)
        if len(entry) > 1:
            diffs.append(entry)
    return {"rows": rows, "differences": diffs}


def plot(runs: dict, summary: dict, out: Path, args) -> None:
    rows = summary["rows"]
    batches = sorted({r["batch_size"] for r in rows})
    fig, axes = common.figure(2)
    chance = next(iter(runs.values()))["metrics"]["chance_mean_recall"]
    common.errorbar_lines(axes[0], batches, {
        arm: [next((r["mean_recall"] for r in rows if r["batch_size"] == b and r["recipe"] == arm), None)
              for b in batches] for arm in ARMS}, "global batch size", "test mean recall", log_x=True,
        chance=chance)
    axes[0].set_title(f"equal examples seen ({args.examples}); 95 % CI, {len(args.seeds)} seeds", fontsize="medium")
    diffs = summary["differences"]
    common.errorbar_lines(axes[1], [d["batch_size"] for d in diffs],
                          {f"{arm} − clip (paired by seed)": [d.get(f"{arm}_minus_clip") for d in diffs]
                           for arm in ("siglip", "siglip_prior")},
                          "global batch size", "difference in test mean recall", log_x=True)
    axes[1].axhline(0.0, color="black", lw=0.8)
    axes[1].set_title("SigLIP's advantage by batch size", fontsize="medium")
    common.save(fig, out / "batch_size.png")


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__, "batch_size")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 16, 32, 64, 128])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(ARMS),
                        help="arms: the shipped clip and siglip, and siglip_prior (bias started at -log(B - 1))")
    parser.add_argument("--examples", type=int, default=4800, help="training pairs seen by the stage that trains everything")
    parser.add_argument("--frozen-examples", type=int, default=640, help="pairs seen by the frozen-tower stage")
    args = parser.parse_args(argv)
    common.setup(args)
    config = common.experiment_config(args, ["clip", "siglip"], **{"examples": args.examples, "frozen_examples": args.frozen_examples})
    plan = [(f"b={batch}/{recipe}/seed={seed}", {"batch_size": batch, "recipe": recipe, "seed": seed})
            for seed in args.seeds for batch in args.batch_sizes for recipe in args.recipes]
    summary = common.execute(args, "batch_size", config, plan, run, summarise, plot)
    print(common.markdown(summary["rows"], ["batch_size", "recipe", "steps"], [
        ("mean_recall", "mean recall"), ("x_chance", "× chance"), ("zero_shot_top1", "zero-shot top-1"),
        ("train_wall_s", "train s")]))
    print(common.markdown(summary["differences"], ["batch_size"], [("siglip_minus_clip", "siglip − clip"),
                                                                   ("siglip_prior_minus_clip", "siglip_prior − clip")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
