"""Alignment recipes at an equal training budget, several seeds each: CLIP vs SigLIP vs DAA (on the English and on
the Chinese captions of the built-in dataset, COCO-CN protocol), mixed encoders vs one encoder, sub-images vs plain at
the same tower resolution (on the high-resolution variant), and SPHINX's merge of a real-caption and a
synthetic-caption model against both endpoints and the model soups.

Every run is the real library: :func:`vlalign.train.train_stage` (the registered objectives, the arch registry, the
loop) on the generated corpus, then :mod:`vlalign.eval` on its test split (retrieval with the multi-caption protocol,
zero-shot classification with its ECE, the compositional probe); merging and soups pick beta / ingredients on the
validation split (:mod:`vlalign.merge`). The budget is the same for every variant of a group: the same number of
optimizer steps at the same batch size and learning-rate schedule, from fresh weights; the wall time of each run is
recorded beside its metrics.

Results are written after every run to ``--out`` (JSON), and a rerun skips the runs already there, so the script
can be stopped and resumed. ``--plot`` draws the summary (mean +- std over seeds) and the merge plot.

    nice -n 10 .venv/bin/python benchmarks/compare_recipes.py --out benchmarks/results/compare_recipes.json
    .venv/bin/python benchmarks/compare_recipes.py --out benchmarks/results/compare_recipes.json --plot-only
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlalign.data.demo import DemoConfig, generate_demo_dataset
from vlalign.data.formats import load_corpus, load_imagefolder, load_lines
from vlalign.data.synthetic import CaptionerContext, SyntheticConfig, attributes_by_file, synthetic_captions
from vlalign.eval.probe import compositional_pairs, compositional_probe
from vlalign.eval.run import evaluate_retrieval, evaluate_zero_shot
from vlalign.merge.soups import greedy_soup, uniform_soup
from vlalign.merge.sweep import merged_checkpoint
from vlalign.models import get_model_config
from vlalign.train import CheckpointStore, StageConfig, model_from_checkpoint, train_stage

log = logging.getLogger("compare_recipes")

CONVNET = {"name": "convnet", "timm_name": "convnext_atto",
           "timm_kwargs": {"depths": [1, 1, 2, 1], "dims": [32, 64, 96, 128]}}
OBJECTIVES = {
    "clip": ("clip", {}, {}),
    "siglip": ("siglip", {}, {"init_temperature": 0.1, "init_logit_bias": -10.0}),
    "daa": ("daa", {"temperature": 0.05}, {}),
}
BETAS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class Corpus:
    """A generated corpus: its manifest (en + zh captions), zero-shot set and per-image attributes."""

    root: Path
    manifest: Any
    karpathy: dict[str, Any]
    zero_shot: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def make(cls, root: Path, config: DemoConfig) -> Corpus:
        generate_demo_dataset(root, config)
        flickr = root / "flickr_demo"
        manifest = load_corpus([
            {"json": str(flickr / "dataset_demo.json"), "image_root": str(flickr / "images"), "lang": "en"},
            {"json": str(flickr / "dataset_demo_zh.json"), "image_root": str(flickr / "images"), "lang": "zh"},
        ])
        karpathy = json.loads((flickr / "dataset_demo.json").read_text(encoding="utf-8"))
        imagenet = root / "imagenet_demo"
        images, _ = load_imagefolder(imagenet / "val", imagenet / "wnids.txt")
        images = images.assign(label=images["label"].astype("int64"))
        zero_shot = {"images": images,
                     **{f"classnames_{l}": load_lines(imagenet / f"classnames_{l}.txt") for l in ("en", "zh")},
                     **{f"templates_{l}": load_lines(imagenet / f"templates_{l}.txt") for l in ("en", "zh")}}
        return cls(root, manifest, karpathy, zero_shot)

    def train_rows(self, lang: str):
        rows = self.manifest[(self.manifest["split"] == "train") & (self.manifest["lang"] == lang)]
        return rows.reset_index(drop=True)


def stage(name: str, objective: str, options: dict, steps: int, args: argparse.Namespace, seed: int, lang: str,
          lr: float | None = None, warmup: int | None = None, batch_size: int | None = None) -> StageConfig:
    return StageConfig(name=name, trainable=["all"], objective=objective, objective_options=options, max_steps=steps,
                       batch_size=batch_size or args.batch_size, lr=lr or args.lr, warmup_steps=args.warmup if warmup is None else warmup,
                       weight_decay=0.1, seed=seed, checkpoint_every=0, log_every=max(steps // 5, 1),
                       caption_langs=[lang], device="cpu")


def evaluate(ckpt: dict[str, Any], corpus: Corpus, lang: str, split: str = "test", probe: tuple[str, ...] = ()) -> dict:
    """Test metrics of a checkpoint: retrieval (mean recall, R@1 both ways), zero-shot acc1 + ECE, the probe."""
    model = model_from_checkpoint(ckpt).eval()
    retrieval = evaluate_retrieval(model, model.config, corpus.manifest, split=split, lang=lang)["metrics"]
    out = {"mean_recall": retrieval["mean_recall"], "t2i_r1": retrieval["image_retrieval_recall@1"],
           "i2t_r1": retrieval["text_retrieval_recall@1"]}
    if split != "test":
        return out
    zs = evaluate_zero_shot(model, model.config, corpus.zero_shot["images"], corpus.zero_shot[f"classnames_{lang}"],
                            corpus.zero_shot[f"templates_{lang}"], lang=lang)
    out.update({"zero_shot_acc1": zs["metrics"]["acc1"], "zero_shot_ece": zs["reliability"]["ece"],
                "zero_shot_probabilities": zs["probabilities"]})
    if probe and lang == "en":
        rows = corpus.manifest[corpus.manifest["split"] == "test"].drop_duplicates("image_path")
        paths = {Path(p).name: (p, r) for p, r in zip(rows["image_path"], rows["image_root"])}
        pairs = compositional_pairs(corpus.karpathy, paths, split="test", attributes=probe, seed=0)
        result = compositional_probe(model, model.config, pairs)
        out.update({f"probe/{k.split('/')[-1]}" if "/" in k else "probe": v for k, v in result["metrics"].items()})
    return out


def train(cfg, st: StageConfig, rows, init: dict | None = None) -> tuple[dict, float]:
    with tempfile.TemporaryDirectory(prefix="compare-") as tmp:
        start = time.perf_counter()
        ckpt = train_stage(cfg, st, rows, init, CheckpointStore(Path(tmp) / st.name))
        return ckpt, time.perf_counter() - start


# ------------------------------------------------------------------------------------------------
# The groups
# ------------------------------------------------------------------------------------------------


def run_single(key: str, corpora: dict, args, spec: dict) -> dict:
    corpus = corpora[spec["data"]]
    cfg = get_model_config(args.model, **spec.get("overrides", {}))
    st = stage(spec["objective"], spec["objective"], spec["options"], spec["steps"], args, spec["seed"], spec["lang"],
               batch_size=spec.get("batch_size"))
    ckpt, wall = train(cfg, st, corpus.train_rows(spec["lang"]))
    metrics = evaluate(ckpt, corpus, spec["lang"], probe=spec.get("probe", ()))
    return {**spec, "metrics": metrics, "train_wall_s": wall, "final_loss": ckpt["history"][-1]["loss"],
            "params": sum(v.numel() for v in ckpt["model"].values() if v.is_floating_point())}


def run_sphinx(key: str, corpora: dict, args, spec: dict) -> dict:
    """real -> (synthetic, synthetic_b, real_ft) fine-tunes; beta sweep real/synthetic on val; soups on val."""
    corpus, seed, lang = corpora["default"], spec["seed"], "en"
    cfg = get_model_config(args.model, **spec.get("overrides", {}))
    real_rows = corpus.train_rows(lang)
    synthetic_rows = synthetic_captions(real_rows, SyntheticConfig(seed=seed, options={"error_rate": 0.15}),
                                        CaptionerContext(attributes=attributes_by_file(corpus.karpathy)))
    walls = {}
    real, walls["real"] = train(cfg, stage("real", "clip", {}, spec["steps"], args, seed, lang), real_rows)
    ft_steps = args.finetune_steps
    ft_lr = args.lr / 2
    fine = {}
    for name, rows, s in (("synthetic", synthetic_rows, seed), ("synthetic_b", synthetic_rows, seed + 100),
                          ("real_ft", real_rows, seed + 200)):
        fine[name], walls[name] = train(cfg, stage(name, "clip", {}, ft_steps, args, s, lang, lr=ft_lr, warmup=10),
                                        rows, init=real)
    val = {name: evaluate(c, corpus, lang, split="val")["mean_recall"] for name, c in {"real": real, **fine}.items()}
    sweep = []
    merged = {}
    for beta in BETAS:
        candidate = merged_checkpoint(real, fine["synthetic"], beta, names=("real", "synthetic"))
        sweep.append({"beta": beta, "score": evaluate(candidate, corpus, lang, split="val")["mean_recall"]})
        merged[beta] = candidate
    best = max(sweep, key=lambda r: (r["score"], -r["beta"]))["beta"]

    def score(c: dict) -> float:
        return evaluate(c, corpus, lang, split="val")["mean_recall"]

    names = list(fine)
    uniform = uniform_soup([fine[n] for n in names], names, score)
    greedy = greedy_soup([fine[n] for n in names], names, score, own_scores=[val[n] for n in names])
    probe = ("colour", "shape", "position")
    test = {
        "real (beta=1)": evaluate(real, corpus, lang, probe=probe),
        "synthetic (beta=0)": evaluate(fine["synthetic"], corpus, lang, probe=probe),
        "merge (best beta)": evaluate(merged[best], corpus, lang, probe=probe),
        "uniform soup": evaluate(uniform.checkpoint, corpus, lang, probe=probe),
        "greedy soup": evaluate(greedy.checkpoint, corpus, lang, probe=probe),
    }
    return {**spec, "val": val, "sweep": sweep, "best_beta": best, "uniform": uniform.summary(),
            "greedy": greedy.summary(), "test": test, "train_wall_s": walls}


GROUPS = ("objectives", "mixed", "subimages", "sphinx")


def per_group(default: int, items: list[str], flag: str) -> dict[str, int]:
    """``default`` for every group, or a group's own value from ``GROUP=VALUE`` items."""
    values = {g: default for g in GROUPS}
    for item in items:
        name, _, value = item.partition("=")
        if name not in values or not value.isdigit():
            raise SystemExit(f"{flag} {item!r}: expected GROUP=INTEGER with GROUP in {list(GROUPS)}")
        values[name] = int(value)
    return values


def group_steps(args) -> dict[str, int]:
    """Optimizer steps of every run of each group (``--steps``, or a group's own ``--group-steps NAME=STEPS``)."""
    return per_group(args.steps, args.group_steps, "--group-steps")


def group_batch(args) -> dict[str, int]:
    """Batch size of every run of each group (``--batch-size``, or ``--group-batch NAME=SIZE``)."""
    return per_group(args.batch_size, args.group_batch, "--group-batch")


def plan_runs(args) -> dict[str, dict]:
    runs: dict[str, dict] = {}
    steps = group_steps(args)
    batch = group_batch(args)
    for seed in args.seeds:
        if "objectives" in args.groups:
            for lang in args.langs:
                for name, (objective, options, overrides) in OBJECTIVES.items():
                    runs[f"objectives/{lang}/{name}/seed{seed}"] = {
                        "group": "objectives", "variant": name, "lang": lang, "seed": seed, "data": "default",
                        "objective": objective, "options": options, "overrides": overrides,
                        "probe": ("colour", "shape", "position"), "steps": steps["objectives"]}
        if "mixed" in args.groups:
            runs[f"mixed/en/mixed/seed{seed}"] = {
                "group": "mixed", "variant": "vit+convnext", "lang": "en", "seed": seed, "data": "default",
                "objective": "clip", "options": {}, "overrides": {"image": {"extra_backbones": [CONVNET]}},
                "probe": ("colour", "shape", "position"), "steps": steps["mixed"]}
        if "subimages" in args.groups:
            tile = 64
            for name, image in (("plain", {"image_size": tile}),
                                ("sub-images", {"image_size": 2 * tile, "sub_images": 2, "sub_image_fusion": "concat"})):
                runs[f"subimages/en/{name}/seed{seed}"] = {
                    "group": "subimages", "variant": name, "lang": "en", "seed": seed, "data": "highres",
                    "objective": "clip", "options": {}, "overrides": {"image": image},
                    "probe": ("pattern", "colour", "shape"), "steps": steps["subimages"],
                    "batch_size": batch["subimages"]}
        if "sphinx" in args.groups:
            runs[f"sphinx/en/sphinx/seed{seed}"] = {"group": "sphinx", "variant": "sphinx", "lang": "en", "seed": seed,
                                                    "data": "default", "overrides": {}, "steps": steps["sphinx"]}
    return runs


# ------------------------------------------------------------------------------------------------
# Summary, table and plots
# ------------------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(results: dict[str, dict]) -> list[dict]:
    """One row per (group, lang, variant): mean and std over seeds of every metric."""
    buckets: dict[tuple, list[dict]] = {}
    for key, r in sorted(results.items()):
        if r["group"] == "sphinx":
            for variant, metrics in r["test"].items():
                buckets.setdefault(("sphinx", "en", variant), []).append(
                    {"metrics": metrics, "train_wall_s": sum(r["train_wall_s"].values())})
            continue
        buckets.setdefault((r["group"], r["lang"], r["variant"]), []).append(r)
        if r["group"] == "objectives" and r["variant"] == "clip" and r["lang"] == "en":
            buckets.setdefault(("mixed", "en", "vit (single)"), []).append(r)
    rows = []
    for (group, lang, variant), items in buckets.items():
        names = [k for k, v in items[0]["metrics"].items() if isinstance(v, (int, float))]
        row = {"group": group, "lang": lang, "variant": variant, "seeds": len(items)}
        for name in names:
            row[name] = _mean_std([float(i["metrics"][name]) for i in items])
        row["train_wall_s"] = _mean_std([float(i["train_wall_s"]) for i in items])
        rows.append(row)
    order = {"objectives": 0, "mixed": 1, "subimages": 2, "sphinx": 3}
    return sorted(rows, key=lambda r: (order.get(r["group"], 9), r["lang"]))


def markdown_table(rows: list[dict]) -> str:
    cols = [("mean_recall", "mean recall"), ("t2i_r1", "T→I R@1"), ("i2t_r1", "I→T R@1"),
            ("zero_shot_acc1", "zero-shot top-1"), ("zero_shot_ece", "zero-shot ECE"), ("probe", "probe"),
            ("probe/pattern", "probe: pattern"), ("train_wall_s", "train s")]
    out = ["| group | captions | variant | seeds | " + " | ".join(c[1] for c in cols) + " |",
           "|---|---|---|---:|" + "---:|" * len(cols)]
    for r in rows:
        cells = []
        for key, _ in cols:
            if key not in r:
                cells.append("–")
            elif key == "train_wall_s":
                cells.append(f"{r[key][0]:.0f} ± {r[key][1]:.0f}")
            else:
                cells.append(f"{r[key][0]:.3f} ± {r[key][1]:.3f}")
        out.append(f"| {r['group']} | {r['lang']} | {r['variant']} | {r['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot_summary(rows: list[dict], path: Path) -> None:
    from vlalign.eval.calibration import agg_figure

    panels = [("objectives", "en"), ("objectives", "zh"), ("mixed", "en"), ("subimages", "en"), ("sphinx", "en")]
    panels = [p for p in panels if any(r["group"] == p[0] and r["lang"] == p[1] for r in rows)]
    fig = agg_figure(figsize=(4.0 * len(panels), 4.2))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (group, lang) in zip(axes, panels):
        items = [r for r in rows if r["group"] == group and r["lang"] == lang]
        labels = [r["variant"] for r in items]
        means = [r["mean_recall"][0] for r in items]
        stds = [r["mean_recall"][1] for r in items]
        ax.bar(range(len(items)), means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(items)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize="small")
        ax.set_title(f"{group} ({lang}, n={items[0]['seeds']} seeds)", fontsize="medium")
        ax.set_ylabel("test mean recall (mean ± std)")
        low = min(m - s for m, s in zip(means, stds))
        ax.set_ylim(max(0.0, low - 0.05), max(m + s for m, s in zip(means, stds)) + 0.03)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)


def plot_merge(results: dict[str, dict], path: Path) -> None:
    from vlalign.eval.merge_plot import save_merge_sweep_plot

    sphinx = [r for r in results.values() if r["group"] == "sphinx"]
    if not sphinx:
        return
    rows = []
    for beta in BETAS:
        values = [next(s["score"] for s in r["sweep"] if s["beta"] == beta) for r in sphinx]
        mean, std = _mean_std(values)
        rows.append({"beta": beta, "score": mean, "std": std})
    soups = []
    for kind in ("uniform", "greedy"):
        mean, std = _mean_std([r[kind]["score"] for r in sphinx])
        kept = sorted({n for r in sphinx for n in r[kind]["ingredients"]})
        soups.append({"kind": kind, "score": mean, "std": std, "ingredients": kept})
    ingredients = []
    for name in ("synthetic", "synthetic_b", "real_ft"):
        mean, _ = _mean_std([r["val"][name] for r in sphinx])
        ingredients.append({"name": name, "score": mean})
    sweep = {"theta1": "real", "theta2": "synthetic", "metric": "mean_recall", "scores": rows}
    save_merge_sweep_plot(path, sweep, soups, ingredients,
                          title=f"SPHINX merge on validation (mean ± std over {len(sphinx)} seeds)")


# ------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/compare_recipes.json")
    parser.add_argument("--data-root", default="data/01_raw", help="where the corpora are generated (shared inputs)")
    parser.add_argument("--groups", nargs="+", default=["objectives", "mixed", "subimages", "sphinx"])
    parser.add_argument("--langs", nargs="+", default=["en", "zh"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps of every run (fresh weights)")
    parser.add_argument("--group-steps", nargs="*", default=["subimages=100"], metavar="GROUP=STEPS",
                        help="a group's own number of steps (the same for every variant of the group)")
    parser.add_argument("--finetune-steps", type=int, default=50, help="steps of each SPHINX fine-tune")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--group-batch", nargs="*", default=["subimages=32"], metavar="GROUP=SIZE",
                        help="a group's own batch size (the same for every variant of the group)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--model", default="tiny-vit-bert")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("vlalign").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    state = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    state["budget"] = {"steps": group_steps(args), "finetune_steps": args.finetune_steps, "batch_size": group_batch(args),
                       "lr": args.lr, "warmup": args.warmup, "model": args.model, "threads": args.threads}
    if not args.plot_only:
        corpora = {"default": Corpus.make(Path(args.data_root) / "demo", DemoConfig()),
                   "highres": Corpus.make(Path(args.data_root) / "demo_highres", DemoConfig(image_size=128, patterns=True))}
        for key, spec in plan_runs(args).items():
            if key in state["runs"]:
                continue
            log.info("run %s", key)
            start = time.perf_counter()
            runner = run_sphinx if spec["group"] == "sphinx" else run_single
            result = runner(key, corpora, args, {k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.items()})
            result["wall_s"] = time.perf_counter() - start
            state["runs"][key] = result
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(state, indent=1))
            log.info("done %s in %.0f s: %s", key, result["wall_s"],
                     {k: round(v, 4) for k, v in (result.get("metrics") or {}).items() if isinstance(v, float)})
    rows = summarise(state["runs"])
    state["summary"] = rows
    out.write_text(json.dumps(state, indent=1))
    table = markdown_table(rows)
    out.with_suffix(".md").write_text(table + "\n")
    plot_summary(rows, out.with_suffix(".png"))
    plot_merge(state["runs"], out.with_name(out.stem + "_merge.png"))
    print(table)


if __name__ == "__main__":
    main()
