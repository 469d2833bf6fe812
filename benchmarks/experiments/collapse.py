"""Semantic collapse: `daa` vs `clip` on near-duplicate captions, in English and in Chinese, with DAA's weight
temperature T_w swept (0.02, 0.05, 0.2, 1.0; T_w = ∞ makes the weights uniform, which is CLIP's InfoNCE).

The corpus is the built-in dataset with ``near_duplicates`` of every split's images drawn in groups of
``--group-size`` large shapes that differ only in colour or only in shape, so their captions differ by one word (one or
two Chinese characters): close in text space, far in image space, the case the DAA source targets. Both recipes run as
shipped (conf/base/parameters_training.yml), with DAA's ``temperature`` set per arm, at the same budget. Each run logs
DAA's effective batch 1/Σw² (the number of images that really carry the loss; N when the weights are uniform) every
``log_every`` steps; the JSON keeps the whole series and the plot shows its mean over seeds.

    .venv/bin/python benchmarks/experiments/collapse.py            # resumable; about 25 min on 2 cores
    .venv/bin/python benchmarks/experiments/collapse.py --plot-only
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

ARMS = (0.02, 0.05, 0.2, 1.0, math.inf)  # T_w; inf: the clip recipe


def json_tw(tw: float) -> float | str:
    """T_w as strict JSON holds it ("inf" for the clip arm)."""
    return "inf" if math.isinf(tw) else tw


def arm_name(tw: float) -> str:
    return "clip (T_w=inf)" if math.isinf(tw) else f"daa T_w={tw:g}"


def run(spec: dict, args) -> dict:
    data = common.corpus(f"near-duplicates-{args.near_duplicates}-g{args.group_size}", args.data_root,
                         near_duplicates=args.near_duplicates, near_duplicate_group_size=args.group_size)
    tw = float(spec["temperature"])
    recipe = "clip" if math.isinf(tw) else "daa"
    budget = common.Budget(steps=args.steps, frozen_steps=args.frozen_steps, batch_size=args.batch_size,
                           seed=spec["seed"], lang=spec["lang"],
                           options={} if recipe == "clip" else {"temperature": tw})
    trained = common.train_recipe(recipe, budget, data)
    effective = {stage: [(h["step"], h["daa_effective_batch"]) for h in hist if "daa_effective_batch" in h]
                 for stage, hist in trained.history.items()}
    return {"metrics": common.evaluate(trained.checkpoint, data, spec["lang"]), "recipe": recipe,
            "effective_batch": effective, "train_wall_s": sum(trained.stage_wall_s.values()),
            "final_loss": {s: h[-1]["loss"] for s, h in trained.history.items() if h}}


def summarise(runs: dict, batch_size: int) -> dict:
    rows = []
    for lang in ("en", "zh"):
        for tw in ARMS:
            items = [r for r in runs.values() if r["spec"]["lang"] == lang and float(r["spec"]["temperature"]) == tw]
            if not items:
                continue
            row = {"lang": lang, "arm": arm_name(tw), "T_w": json_tw(tw), "seeds": [r["spec"]["seed"] for r in items],
                   "mean_recall": common.interval(r["metrics"]["mean_recall"] for r in items),
                   "x_chance": common.interval(r["metrics"]["x_chance"] for r in items),
                   "train_wall_s": common.interval(r["train_wall_s"] for r in items)}
            last = [r["effective_batch"]["stage2"][-1][1] for r in items if r["effective_batch"].get("stage2")]
            low = [min(v for _, v in r["effective_batch"]["stage2"]) for r in items if r["effective_batch"].get("stage2")]
            if last:
                row["effective_batch_final"] = common.interval(last)
                row["effective_batch_min"] = common.interval(low)
            else:
                row["effective_batch_final"] = common.interval([float(batch_size)] * len(items))  # uniform weights
            rows.append(row)
    return {"rows": rows}


def plot(runs: dict, summary: dict, out: Path, args) -> None:
    rows = summary["rows"]
    fig, axes = common.figure(3)
    for ax, lang in zip(axes[:2], ("en", "zh")):
        part = [r for r in rows if r["lang"] == lang]
        if not part:
            continue
        labels = [r["arm"] for r in part]
        ax.bar(range(len(part)), [r["mean_recall"]["mean"] for r in part],
               yerr=[r["mean_recall"]["ci95"] for r in part], capsize=4, color="tab:blue", alpha=0.8)
        chance = next(r for r in runs.values() if r["spec"]["lang"] == lang)["metrics"]["chance_mean_recall"]
        ax.axhline(chance, color="grey", ls=":", lw=1, label="chance")
        ax.set_xticks(range(len(part)))
        ax.set_xticklabels(labels, rotation=25, ha="right", fontsize="small")
        ax.set_ylabel("test mean recall")
        ax.set_title(f"near-duplicate captions ({lang}; 95 % CI, {len(part[0]['seeds'])} seeds)", fontsize="medium")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small")
    ax = axes[2]
    for tw in ARMS[:-1]:
        series = [r["effective_batch"]["stage2"] for r in runs.values()
                  if float(r["spec"]["temperature"]) == tw and r["spec"]["lang"] == "en" and r["effective_batch"].get("stage2")]
        if series:
            steps = [s for s, _ in series[0]]
            means = [sum(s[i][1] for s in series) / len(series) for i in range(min(map(len, series)))]
            ax.plot(steps[:len(means)], means, marker=".", label=arm_name(tw))
    ax.axhline(args.batch_size, color="grey", ls=":", lw=1, label=f"uniform (CLIP) = {args.batch_size}")
    ax.set_yscale("log")
    ax.set_xlabel("stage-2 step")
    ax.set_ylabel("effective batch 1/Σw² (en, mean over seeds)")
    ax.set_title("DAA weights: how many images carry the loss", fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    common.save(fig, out / "collapse.png")


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__, "collapse")
    parser.add_argument("--langs", nargs="+", default=["en", "zh"], choices=["en", "zh"])
    parser.add_argument("--temperatures", nargs="+", type=float, default=list(ARMS),
                        help="DAA weight temperatures T_w (inf: the clip recipe)")
    parser.add_argument("--near-duplicates", type=float, default=0.6, help="fraction of images in near-duplicate groups")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--frozen-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    common.setup(args)
    config = common.experiment_config(args, ["clip", "daa"], **{"steps": args.steps, "frozen_steps": args.frozen_steps, "batch_size": args.batch_size,
              "near_duplicates": args.near_duplicates, "group_size": args.group_size})
    plan = [(f"{lang}/tw={tw:g}/seed={seed}", {"lang": lang, "temperature": json_tw(tw), "seed": seed})
            for seed in args.seeds for lang in args.langs for tw in args.temperatures]
    summary = common.execute(args, "collapse", config, plan, run, lambda runs: summarise(runs, args.batch_size), plot)
    print(common.markdown(summary["rows"], ["lang", "arm"], [
        ("mean_recall", "mean recall"), ("x_chance", "× chance"), ("effective_batch_final", "effective batch (end)"),
        ("effective_batch_min", "effective batch (min)"), ("train_wall_s", "train s")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
