"""CLIP vs ALBEF at an equal budget on the built-in dataset: same towers, batch, steps and schedule, several seeds.

Usage:
    nice -n 10 .venv/bin/python benchmarks/compare_albef.py --steps 60 --seeds 0 1 2 --out benchmarks/results/albef

Variants (each one training stage from scratch, every parameter trained, the tiny-vit-bert towers):

- ``clip``: the dual encoder with InfoNCE (objective ``clip``);
- ``albef_itc_mod``: arch ``fusion``, objective ``albef`` with ITC only: momentum teacher (m = 0.995), queue of momentum
  features, momentum distillation (alpha 0.4 ramped over the first epoch), same-image positives masked by image id;
- ``albef_itc_itm_mlm``: the same plus ITM with hard negatives and image-conditioned MLM (all weights 1);
- ``albef_rerank``: the ``albef_itc_itm_mlm`` models, retrieval re-ranked by ITM (top ``--k-test`` of ITC re-scored).

Each model is evaluated as the pipeline does (vlalign.eval): test-split retrieval in English (multi-caption protocol,
``mean_recall`` = mean of R@1/5/10 both ways), zero-shot top-1 on the built-in class set (English templates), and the
compositional probe (true vs attribute-swapped caption). Zero-shot and the probe read the ITC embeddings, so
``albef_rerank`` shares them with ``albef_itc_itm_mlm``. Writes ``<out>.json`` (every run, the means and standard
deviations over seeds, the budget and wall times) and ``<out>.png`` (bars with mean +- std).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from vlalign.data.demo import DemoConfig, generate_demo_dataset
from vlalign.data.formats import load_corpus, load_imagefolder, load_lines
from vlalign.eval.probe import compositional_pairs, compositional_probe
from vlalign.eval.rerank import RerankConfig, evaluate_rerank
from vlalign.eval.run import evaluate_retrieval, evaluate_zero_shot
from vlalign.models import get_model_config
from vlalign.train import CheckpointStore, StageConfig, model_from_checkpoint, train_stage

# The conventions these results were measured with (the objective's defaults became ALBEF's; docs/conventions.md).
CONVENTIONS = {"itm_negatives": "student", "mask_same_image": True, "mlm_mask_sep": False, "queue_init": "empty"}
VARIANTS = {
    "clip": ({"arch": "dual"}, "clip", {}),
    "albef_itc_mod": ({"arch": "fusion", "arch_options": {"decoder_layers": 0}}, "albef",
                      {"itm_weight": 0.0, "mlm_weight": 0.0, **CONVENTIONS}),
    "albef_itc_itm_mlm": ({"arch": "fusion", "arch_options": {"decoder_layers": 0}}, "albef", dict(CONVENTIONS)),
}
METRICS = (("retrieval mean recall", "mean_recall"), ("zero-shot top-1", "acc1"),
           ("compositional probe", "compositional_accuracy"))


def data(root: Path) -> tuple:
    """The built-in dataset (generated when absent): manifest, zero-shot images/classes/templates, probe pairs."""
    generate_demo_dataset(root, DemoConfig())
    flickr = root / "flickr_demo"
    manifest = load_corpus([{"json": str(flickr / "dataset_demo.json"), "image_root": str(flickr / "images"), "lang": "en"},
                            {"json": str(flickr / "dataset_demo_zh.json"), "image_root": str(flickr / "images"),
                             "lang": "zh"}])
    images, _ = load_imagefolder(root / "imagenet_demo" / "val", root / "imagenet_demo" / "wnids.txt")
    images = images[images["load_error"].isna()].assign(label=lambda f: f["label"].astype(int))  # as validation does
    classnames = load_lines(root / "imagenet_demo" / "classnames_en.txt")
    templates = load_lines(root / "imagenet_demo" / "templates_en.txt")
    test = manifest[manifest["split"] == "test"].drop_duplicates("image_path")
    paths = {Path(p).name: (p, r) for p, r in zip(test["image_path"], test["image_root"])}
    probe = compositional_pairs(json.loads((flickr / "dataset_demo.json").read_text()), paths, split="test")
    return manifest, images, classnames, templates, probe


def evaluate(model, cfg, manifest, images, classnames, templates, probe, rerank: RerankConfig | None) -> dict:
    """mean recall (and re-ranked), zero-shot top-1, compositional accuracy."""
    out = {"mean_recall": evaluate_retrieval(model, cfg, manifest, "test", "en")["metrics"]["mean_recall"],
           "acc1": evaluate_zero_shot(model, cfg, images, classnames, templates, "en")["metrics"]["acc1"],
           "compositional_accuracy": compositional_probe(model, cfg, probe)["metrics"]["compositional_accuracy"]}
    if rerank is not None:
        start = time.perf_counter()
        result = evaluate_rerank(model, cfg, manifest, "test", "en", rerank)
        out["rerank_mean_recall"] = result["metrics"]["mean_recall"]
        out["rerank_seconds"] = time.perf_counter() - start
        out["rerank_pairs_fused"] = result["n_pairs_fused"]
    return out


def summarise(runs: list[dict]) -> dict:
    """Mean and standard deviation over seeds of each variant's metrics (the re-ranked variant from the full ALBEF)."""
    table: dict[str, dict] = {}
    rows = {name: [r for r in runs if r["variant"] == name] for name in VARIANTS}
    rows["albef_rerank"] = [{**r, "metrics": {**r["metrics"], "mean_recall": r["metrics"]["rerank_mean_recall"]}}
                            for r in rows["albef_itc_itm_mlm"] if "rerank_mean_recall" in r["metrics"]]
    for name, items in rows.items():
        if not items:
            continue
        table[name] = {"seeds": [r["seed"] for r in items], "train_seconds": statistics.mean(r["train_seconds"] for r in items)}
        for _, key in METRICS:
            values = [r["metrics"][key] for r in items]
            table[name][key] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                                "values": values}
    return table


def plot(table: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.8))
    for ax, (label, key) in zip(axes, METRICS):
        means = [table[n][key]["mean"] for n in names]
        stds = [table[n][key]["std"] for n in names]
        ax.bar(range(len(names)), means, yerr=stds, capsize=4, color=["#888", "#4a7", "#37b", "#c63"][:len(names)])
        for x, n in enumerate(names):  # every seed as a dot
            ax.plot([x] * len(table[n][key]["values"]), table[n][key]["values"], "k.", markersize=4)
        ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=8)
        ax.set_title(label)
        ax.set_ylim(0, max(1e-6, max(m + s for m, s in zip(means, stds))) * 1.15)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run (every variant)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--queue-size", type=int, default=1024)
    parser.add_argument("--k-test", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--demo-root", type=Path, default=Path("data/01_raw/demo"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compare_albef"))
    args = parser.parse_args(argv)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    manifest, images, classnames, templates, probe = data(args.demo_root)
    json_path, png_path = args.out.with_suffix(".json"), args.out.with_suffix(".png")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(json_path.read_text())["runs"] if json_path.exists() else []  # resumable: finished runs kept
    budget = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": args.warmup,
              "towers": "tiny-vit-bert", "caption_langs": ["en", "zh"], "queue_size": args.queue_size,
              "k_test": args.k_test, "train_images": int(manifest[manifest["split"] == "train"]["image_id"].nunique())}
    runs = [r for r in runs if r.get("budget") == budget]
    with tempfile.TemporaryDirectory() as scratch:
        for seed in args.seeds:
            for name in args.variants:
                if any(r["variant"] == name and r["seed"] == seed for r in runs):
                    continue
                overrides, objective, options = VARIANTS[name]
                cfg = get_model_config("tiny-vit-bert", **overrides)
                if objective == "albef":
                    options = {**options, "queue_size": args.queue_size}
                stage = StageConfig(name=name, trainable=["all"], max_steps=args.steps, batch_size=args.batch_size,
                                    lr=args.lr, warmup_steps=args.warmup, seed=seed, checkpoint_every=0, log_every=10,
                                    caption_langs=["en", "zh"], device="cpu", objective=objective,
                                    objective_options=options)
                start = time.perf_counter()
                final = train_stage(cfg, stage, manifest, None, CheckpointStore(Path(scratch) / f"{name}-{seed}"))
                seconds = time.perf_counter() - start
                model = model_from_checkpoint(final)
                rerank = RerankConfig(k_test=args.k_test) if name == "albef_itc_itm_mlm" else None
                metrics = evaluate(model, cfg, manifest, images, classnames, templates, probe, rerank)
                runs.append({"variant": name, "seed": seed, "train_seconds": seconds, "metrics": metrics,
                             "final_loss": final["history"][-1]["loss"], "budget": budget})
                print(f"{name} seed {seed}: {seconds:.0f} s, {metrics}", flush=True)
                json_path.write_text(json.dumps({"budget": budget, "runs": runs}, indent=2) + "\n", encoding="utf-8")
    table = summarise(runs)
    json_path.write_text(json.dumps({"budget": budget, "runs": runs, "table": table}, indent=2) + "\n", encoding="utf-8")
    plot(table, png_path, f"tiny-vit-bert towers, {args.steps} steps x batch {args.batch_size}, seeds {args.seeds}; "
                          f"re-ranking k_test={args.k_test}")
    print("| variant | mean recall | zero-shot top-1 | compositional | train s |")
    print("|---|---:|---:|---:|---:|")
    for name, row in table.items():
        cells = " | ".join(f"{row[k]['mean']:.4f} ± {row[k]['std']:.4f}" for _, k in METRICS)
        print(f"| {name} | {cells} | {row['train_seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
