"""Training budget: `albef` vs `clip` at three budgets, up to one covering several momentum time constants.

ALBEF's momentum teacher averages the student with m = 0.995, a time constant of 1/(1 − m) = 200 steps: over a budget
shorter than that the teacher is mostly the initial model, and momentum distillation cannot help. Both recipes run as
shipped (conf/base/parameters_training.yml) on the built-in data (English) at ``--budgets`` optimizer steps of the
stage that trains everything (the largest covers several time constants), with the same batch size. An ALBEF step
costs about three CLIP steps on CPU (ITM with hard negatives and MLM), so the plot's x-axis is the measured training
wall-clock: at equal seconds CLIP has taken three times the steps.

    .venv/bin/python benchmarks/experiments/budget.py            # resumable; about 40 min on 2 cores
    .venv/bin/python benchmarks/experiments/budget.py --plot-only
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

RECIPES = ("clip", "albef")


def run(spec: dict, args) -> dict:
    data = common.corpus("default", args.data_root)
    budget = common.Budget(steps=spec["steps"], frozen_steps=args.frozen_steps, batch_size=args.batch_size,
                           seed=spec["seed"])
    trained = common.train_recipe(spec["recipe"], budget, data)
    return {"metrics": common.evaluate(trained.checkpoint, data, "en", rerank_k=args.k_test),
            "stage_wall_s": trained.stage_wall_s, "train_wall_s": sum(trained.stage_wall_s.values()),
            "params": common.params_of(trained.checkpoint)}


def summarise(runs: dict) -> dict:
    rows = []
    for steps in sorted({r["spec"]["steps"] for r in runs.values()}):
        for recipe in RECIPES:
            items = [r for r in runs.values() if r["spec"]["steps"] == steps and r["spec"]["recipe"] == recipe]
            if not items:
                continue
            row = {"steps": steps, "recipe": recipe, "seeds": [r["spec"]["seed"] for r in items],
                   "time_constants": round(steps * (1 - 0.995), 2),
                   "train_wall_s": common.interval(r["train_wall_s"] for r in items),
                   "s_per_step": common.interval(sum(v for k, v in r["stage_wall_s"].items() if k != "stage1")
                                                 / steps for r in items)}
            for name in ("mean_recall", "x_chance", "rerank_mean_recall", "rerank_gain"):
                if all(name in r["metrics"] for r in items):
                    row[name] = common.interval(r["metrics"][name] for r in items)
            rows.append(row)
    return {"rows": rows}


def quiet_step_seconds(args) -> dict[str, float] | None:
    """Seconds per stage-2 step of each recipe at this batch size, measured alone (cost.py --batch-size B, written
    to cost_b<B>.json): the runs here share the CPU with each other, so their own wall times overstate and blur it."""
    path = common.RESULTS / f"cost_b{args.batch_size}.json"
    if not path.exists():
        return None
    import json

    return {r["recipe"]: r["s_per_step"] for r in json.loads(path.read_text(encoding="utf-8"))["rows"]}


def plot(runs: dict, summary: dict, out: Path, args) -> None:
    rows = summary["rows"]
    fig, axes = common.figure(2)
    quiet = quiet_step_seconds(args)
    for recipe, key, label in (("clip", "mean_recall", "clip"), ("albef", "mean_recall", "albef (ITC)"),
                               ("albef", "rerank_mean_recall", "albef + ITM re-rank")):
        part = [r for r in rows if r["recipe"] == recipe and key in r]
        if part:
            xs = [r["steps"] * quiet[recipe] if quiet else r["train_wall_s"]["mean"] for r in part]
            axes[0].errorbar(xs, [r[key]["mean"] for r in part], yerr=[r[key]["ci95"] for r in part],
                             marker="o", capsize=3, label=label)
            for x, r in zip(xs, part):
                axes[0].annotate(f"{r['steps']}", (x, r[key]["mean"]), fontsize="x-small",
                                 textcoords="offset points", xytext=(4, -10))
    axes[0].set_xscale("log")
    axes[0].set_xlabel("stage-2 seconds at the quiet step cost (cost_b%d.json; labels: steps)" % args.batch_size
                       if quiet else "training wall-clock seconds (2 CPU cores; labels: steps)")
    axes[0].set_ylabel("test mean recall")
    axes[0].set_title(f"equal steps, compared by time (95 % CI, {len(args.seeds)} seeds)", fontsize="medium")
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    steps = sorted({r["steps"] for r in rows})
    common.errorbar_lines(axes[1], steps, {
        recipe: [next((r["mean_recall"] for r in rows if r["steps"] == s and r["recipe"] == recipe), None) for s in steps]
        for recipe in RECIPES}, "optimizer steps of stage 2", "test mean recall")
    for k in range(1, 1 + max(steps) // 200):
        axes[1].axvline(200 * k, color="grey", ls=":", lw=0.8)
    axes[1].set_title("by steps (dotted: momentum time constants, 200 steps)", fontsize="medium")
    common.save(fig, out / "budget.png")


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__, "budget")
    parser.add_argument("--budgets", nargs="+", type=int, default=[100, 300, 600], help="steps of the full stage")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--frozen-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--k-test", type=int, default=16, help="candidates re-scored by ITM (albef)")
    args = parser.parse_args(argv)
    common.setup(args)
    config = common.experiment_config(args, ["clip", "albef"], **{"frozen_steps": args.frozen_steps, "batch_size": args.batch_size, "k_test": args.k_test})
    plan = [(f"steps={steps}/{recipe}/seed={seed}", {"steps": steps, "recipe": recipe, "seed": seed})
            for seed in args.seeds for steps in args.budgets for recipe in args.recipes]
    summary = common.execute(args, "budget", config, plan, run, summarise, plot)
    print(common.markdown(summary["rows"], ["steps", "recipe", "time_constants"], [
        ("mean_recall", "mean recall"), ("x_chance", "× chance"), ("rerank_mean_recall", "re-ranked"),
        ("train_wall_s", "train s"), ("s_per_step", "s / step")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
