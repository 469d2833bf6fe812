"""What every recipe experiment shares (benchmarks/experiments/*.py): the shipped recipes at a chosen budget, the
generated corpora with their controlled conditions, a per-run cache, mean +- 95 % intervals, and plots.

- **Recipes as shipped.** :func:`recipe_run` reads ``conf/base/parameters_training.yml``, resolves a recipe's stages
  and model exactly as the pipeline does (:mod:`vlalign_pipelines.recipes`), and changes only the budget: each stage
  gets ``max_steps`` (a frozen-tower stage ``frozen_steps``; the other stages share ``steps`` in proportion to their
  ``epochs``), the batch size, the seed and the caption language. A stage with ``data: capfilt_shards`` trains on the
  CapFilt corpus of the stage the recipe's ``capfilt.after`` names, filtered by :mod:`vlalign.data.capfilt`, as the
  pipeline's CapFilt node does.
- **Runs are cached** one JSON file each (``<out>/runs/<key>.json``, written atomically). A rerun skips every run whose
  file holds the same experiment config, so a crash or Ctrl-C loses one run at most; ``--plot-only`` redraws.
- **Statistics**: mean and the half-width of the 95 % t-interval over seeds (:func:`interval`); no seed is dropped.

Every number these scripts write comes from the library itself (``vlalign.train.train_stage``, ``vlalign.eval``,
``vlalign.data.capfilt``); nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf" / "base" / "parameters_training.yml"
RESULTS = ROOT / "docs" / "recipes"
log = logging.getLogger("experiments")


# ------------------------------------------------------------------------------------------------ statistics


def interval(values: Iterable[float]) -> dict[str, Any]:
    """Mean, the half-width of its two-sided 95 % Student-t interval (0 for one value), and the values."""
    from scipy import stats

    xs = [float(v) for v in values]
    mean = statistics.fmean(xs)
    half = 0.0
    if len(xs) > 1:
        half = float(stats.t.ppf(0.975, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs)))
    return {"mean": mean, "ci95": half, "n": len(xs), "values": xs}


def fmt(cell: dict[str, Any] | None, digits: int = 3) -> str:
    """``mean ± ci95`` of an :func:`interval` (``–`` when missing)."""
    if not cell:
        return "–"
    return f"{cell['mean']:.{digits}f} ± {cell['ci95']:.{digits}f}"


def roc_auc(scores: Iterable[float], positive: Iterable[bool]) -> float:
    """Area under the ROC curve of ``scores`` separating ``positive`` from the rest (Mann-Whitney, ties count 1/2)."""
    from scipy.stats import rankdata

    s = [float(x) for x in scores]
    p = [bool(x) for x in positive]
    n_pos, n_neg = sum(p), len(p) - sum(p)
    if not n_pos or not n_neg:
        return float("nan")
    ranks = rankdata(s)
    return float((sum(r for r, y in zip(ranks, p) if y) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(scores: Iterable[float], positive: Iterable[bool], points: int = 101) -> list[tuple[float, float]]:
    """(false-positive rate, true-positive rate) of ``score >= t`` at ``points`` thresholds spanning the scores."""
    import numpy as np

    s, p = np.asarray(list(scores), dtype=float), np.asarray(list(positive), dtype=bool)
    if not p.any() or p.all():
        return []
    thresholds = np.unique(np.quantile(s, np.linspace(0.0, 1.0, points)))[::-1]
    curve = [(0.0, 0.0)]
    for t in thresholds:
        hit = s >= t
        curve.append((float(hit[~p].mean()), float(hit[p].mean())))
    curve.append((1.0, 1.0))
    return curve


# ------------------------------------------------------------------------------------------------ run cache


def _slug(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Runs:
    """One JSON file per run under ``<out>/runs``; a run is reused only when made with the same experiment config."""

    out: Path
    config: dict[str, Any]
    done: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.hash = config_hash(self.config)
        for path in sorted((self.out / "runs").glob("*.json")) if (self.out / "runs").is_dir() else []:
            record = json.loads(path.read_text(encoding="utf-8"))
            if record.get("config_hash") == self.hash:
                self.done[record["key"]] = record

    def run(self, key: str, spec: dict[str, Any], fn: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        """The cached record of ``key``, or ``fn(spec)`` run now, timed and written before it is returned."""
        if key in self.done:
            return self.done[key]
        log.info("run %s", key)
        start = time.perf_counter()
        result = fn(spec)
        record = {"key": key, "config_hash": self.hash, "spec": spec, **result,
                  "wall_s": time.perf_counter() - start}
        path = self.out / "runs" / f"{_slug(key)}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8") as fh:
            json.dump(record, fh, indent=1, default=float)
        os.replace(fh.name, path)
        self.done[key] = record
        log.info("done %s in %.0f s: %s", key, record["wall_s"],
                 {k: round(v, 4) for k, v in (record.get("metrics") or {}).items() if isinstance(v, float)})
        return record


def execute(args: argparse.Namespace, name: str, config: dict[str, Any], plan: Iterable[tuple[str, dict[str, Any]]],
            run: Callable[[dict[str, Any], argparse.Namespace], dict[str, Any]],
            summarise: Callable[[dict[str, dict]], Any],
            plot: Callable[[dict, Any, Path, argparse.Namespace], None]) -> Any:
    """An experiment's common course: every planned ``(key, spec)`` run (cached ones skipped; none with
    ``--plot-only``), then its summary written to ``<out>/<name>.json`` and its plot drawn. Returns the summary."""
    out = Path(args.out)
    runs = Runs(out, config)
    if not args.plot_only:
        for key, spec in plan:
            runs.run(key, spec, lambda s: run(s, args))
    summary = summarise(runs.done)
    write_summary(out, name, config, runs.done, summary)
    plot(runs.done, summary, out, args)
    return summary


def write_summary(out: Path, name: str, config: dict[str, Any], runs: dict[str, dict], summary: Any,
                  extra: dict[str, Any] | None = None) -> Path:
    """``<out>/<name>.json``: the experiment config, every run's key and wall time, and the summary."""
    from vlalign import reproducibility

    path = Path(out) / f"{name}.json"
    body = {"experiment": name, "config": config, "config_hash": config_hash(config), "n_runs": len(runs),
            "total_wall_s": sum(r["wall_s"] for r in runs.values()), "host": reproducibility.describe_host(),
            "summary": summary, **(extra or {})}
    path.write_text(json.dumps(body, indent=1, default=float) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ data


@dataclass
class Corpus:
    """A generated corpus (its controlled conditions applied): manifest (en + zh), zero-shot set, ground truth."""

    root: Path
    manifest: Any
    zero_shot: dict[str, Any]
    ground_truth: dict[str, Any]
    karpathy: dict[str, Any]

    def train_rows(self, lang: str):
        rows = self.manifest[(self.manifest["split"] == "train") & (self.manifest["lang"] == lang)]
        return rows.reset_index(drop=True)


#: DemoConfig fields every corpus of this process gets (``--demo KEY=VALUE``, e.g. a smaller corpus for a smoke run).
DEMO_OVERRIDES: dict[str, Any] = {}
_CORPORA: dict[tuple, Corpus] = {}


def corpus(name: str, data_root: Path, **conditions: Any) -> Corpus:
    """The built-in dataset with ``conditions`` (DemoConfig fields), generated under ``data_root/<name>`` when absent
    (loaded once per process)."""
    conditions = {**conditions, **DEMO_OVERRIDES}
    key = (name, str(data_root), json.dumps(conditions, sort_keys=True))
    if key not in _CORPORA:
        suffix = f"-{config_hash(DEMO_OVERRIDES)[:8]}" if DEMO_OVERRIDES else ""
        _CORPORA[key] = _load_corpus(Path(data_root) / f"{name}{suffix}", conditions)
    return _CORPORA[key]


def _load_corpus(root: Path, conditions: dict[str, Any]) -> Corpus:
    from vlalign.data.demo import GROUND_TRUTH_FILE, DemoConfig, generate_demo_dataset
    from vlalign.data.formats import load_corpus, load_imagefolder, load_lines

    generate_demo_dataset(root, DemoConfig.from_mapping(conditions))
    flickr = root / "flickr_demo"
    manifest = load_corpus([
        {"json": str(flickr / "dataset_demo.json"), "image_root": str(flickr / "images"), "lang": "en"},
        {"json": str(flickr / "dataset_demo_zh.json"), "image_root": str(flickr / "images"), "lang": "zh"},
    ])
    imagenet = root / "imagenet_demo"
    images, _ = load_imagefolder(imagenet / "val", imagenet / "wnids.txt")
    images = images.assign(label=images["label"].astype("int64"))
    zero_shot = {"images": images,
                 **{f"classnames_{lang}": load_lines(imagenet / f"classnames_{lang}.txt") for lang in ("en", "zh")},
                 **{f"templates_{lang}": load_lines(imagenet / f"templates_{lang}.txt") for lang in ("en", "zh")}}
    truth_file = flickr / GROUND_TRUTH_FILE
    truth = json.loads(truth_file.read_text(encoding="utf-8")) if truth_file.exists() else {}
    karpathy = json.loads((flickr / "dataset_demo.json").read_text(encoding="utf-8"))
    return Corpus(root, manifest, zero_shot, truth, karpathy)


# ------------------------------------------------------------------------------------------------ recipes


def conf_digest() -> str:
    """A digest of the whole conf/base/parameters_training.yml (what the first runs' configs recorded)."""
    return hashlib.sha256(CONF.read_bytes()).hexdigest()[:12]


def recipe_digest(names: Iterable[str]) -> str:
    """A digest of what the recipes ``names`` resolve to (stages, model, sections): cached runs are reused until one
    of the experiment's own recipes changes, whatever else changes in the file."""
    from vlalign_pipelines.recipes import plan, resolve_model, resolve_stages

    model, training = training_conf()
    body = {name: {"stages": resolve_stages(training, name), "model": resolve_model(model, training, name),
                   "sections": plan(training, name).sections} for name in sorted(set(names))}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:12]


def training_conf() -> tuple[dict[str, Any], dict[str, Any]]:
    """``(params:model, params:training)`` of conf/base."""
    body = yaml.safe_load(CONF.read_text(encoding="utf-8"))
    return body["model"], body["training"]


@dataclass
class Budget:
    """What an experiment changes in a shipped recipe: steps, batch, seed, language (and optional stage edits)."""

    steps: int  # optimizer steps shared by the stages that train everything (split by their epochs)
    frozen_steps: int = 20  # steps of a stage that trains only some parameters (LiT-style projections)
    batch_size: int = 64
    seed: int = 0
    lang: str = "en"
    options: dict[str, Any] = field(default_factory=dict)  # merged into every stage's objective_options
    stage_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per stage name, merged after `options`
    lr: float | None = None  # every stage's learning rate (None: the recipe's)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields over the recipe's


def recipe_stages(recipe: str, budget: Budget) -> tuple[Any, list[tuple[Any, dict[str, Any]]], dict[str, Any]]:
    """The recipe's model config and stages (StageConfig, wiring) at ``budget``, and its recipe-specific sections."""
    from vlalign.models import get_model_config
    from vlalign.train import StageConfig
    from vlalign_pipelines.recipes import plan as recipe_plan, resolve_model, resolve_stages

    model, training = training_conf()
    plan = recipe_plan(training, recipe)
    resolved = resolve_model(model, training, recipe)
    cfg = get_model_config(resolved["name"], **{**(resolved.get("overrides") or {}), **budget.model_overrides})
    stages = resolve_stages(training, recipe)
    frozen = [s["trainable"] != ["all"] for s in stages]
    epochs = [max(int(s.get("epochs") or 1), 1) for s, f in zip(stages, frozen)]
    total = sum(e for e, f in zip(epochs, frozen) if not f) or 1
    out = []
    for spec, is_frozen, ep, wiring in zip(stages, frozen, epochs, plan.stages):
        steps = budget.frozen_steps if is_frozen else max(round(budget.steps * ep / total), 1)
        options = {**(spec.get("objective_options") or {}), **budget.options,
                   **budget.stage_options.get(spec["name"], {})}
        fields = {**spec, "objective_options": options, "max_steps": steps, "batch_size": budget.batch_size,
                  "seed": spec.get("seed", 0) + budget.seed, "caption_langs": [budget.lang], "device": "cpu",
                  "reproducibility": "native", "cpu_threads": None, "checkpoint_every": 0,
                  "log_every": max(steps // 20, 1), "warmup_steps": min(spec.get("warmup_steps", 0), max(steps // 5, 1)),
                  "compute": "local", "num_workers": 0, "cache_in_memory": True}
        if budget.lr is not None:
            fields["lr"] = budget.lr
        out.append((StageConfig.from_dict(fields), {"data": wiring.data, "init": wiring.init}))
    return cfg, out, plan.sections


@dataclass
class Trained:
    """A recipe trained at a budget: the final checkpoint, per-stage wall time and history, CapFilt's scored pairs."""

    checkpoint: dict[str, Any]
    stage_wall_s: dict[str, float]
    history: dict[str, list[dict[str, Any]]]
    capfilt: Any = None  # the scored pairs DataFrame of run_capfilt (recipes with a capfilt section)
    capfilt_threshold: float | None = None
    checkpoints: dict[str, dict[str, Any]] = field(default_factory=dict)


def train_recipe(recipe: str, budget: Budget, data: Corpus, capfilt_overrides: dict[str, Any] | None = None,
                 keep: Iterable[str] = ()) -> Trained:
    """Train every stage of ``recipe`` at ``budget`` on ``data``'s training rows in ``budget.lang`` (CapFilt between
    stages when the recipe has it). ``keep``: names of stages whose final checkpoints are returned too."""
    from vlalign.data.capfilt import CapFiltConfig, calibrate, effective_threshold, filtered_manifest, run_capfilt
    from vlalign.train import CheckpointStore, model_from_checkpoint, train_stage

    cfg, stages, sections = recipe_stages(recipe, budget)
    rows = data.train_rows(budget.lang)
    finals: dict[str, dict[str, Any]] = {}
    walls: dict[str, float] = {}
    history: dict[str, list] = {}
    scored, threshold = None, None
    with tempfile.TemporaryDirectory(prefix=f"exp-{recipe}-") as tmp:
        for stage, wiring in stages:
            init = finals[wiring["init"]] if wiring["init"] else None
            stage_rows = rows
            if wiring["data"] == "capfilt_shards":
                section = {**(sections.get("capfilt") or {}), **(capfilt_overrides or {})}
                config = CapFiltConfig.from_dict(section)
                model = model_from_checkpoint(finals[config.after])
                start = time.perf_counter()
                validation = data.manifest[(data.manifest["split"] == "val") & (data.manifest["lang"] == budget.lang)]
                calibration = calibrate(model, model.config, validation.reset_index(drop=True), config)
                scored = run_capfilt(model, model.config, rows, config, calibration)
                threshold = effective_threshold(scored["itm_score"], config, calibration)
                walls["capfilt"] = time.perf_counter() - start
                stage_rows = filtered_manifest(scored, config)
            start = time.perf_counter()
            ckpt = train_stage(cfg, stage, stage_rows, init, CheckpointStore(Path(tmp) / stage.name))
            walls[stage.name] = time.perf_counter() - start
            history[stage.name] = ckpt.get("history", [])
            finals[stage.name] = ckpt
    return Trained(finals[stages[-1][0].name], walls, history, scored, threshold, {k: v for k, v in finals.items() if k in set(keep)})


# ------------------------------------------------------------------------------------------------ evaluation


def evaluate(ckpt: dict[str, Any], data: Corpus, lang: str = "en", rerank_k: int = 0,
             zero_shot: bool = False) -> dict[str, Any]:
    """Test-split retrieval (multi-caption protocol) with its chance ratio; the ITM re-ranked metrics too when
    ``rerank_k`` and the model has an ITM head; zero-shot top-1 when asked."""
    from vlalign.eval.rerank import RerankConfig, evaluate_rerank, has_itm_head
    from vlalign.eval.run import evaluate_retrieval, evaluate_zero_shot
    from vlalign.train import model_from_checkpoint

    model = model_from_checkpoint(ckpt).eval()
    result = evaluate_retrieval(model, model.config, data.manifest, split="test", lang=lang)
    m = result["metrics"]
    chance = result["chance"]["mean_recall"]
    out = {"mean_recall": m["mean_recall"], "chance_mean_recall": chance, "x_chance": m["mean_recall"] / chance,
           "t2i_r1": m["image_retrieval_recall@1"], "i2t_r1": m["text_retrieval_recall@1"]}
    if rerank_k and has_itm_head(model):
        rr = evaluate_rerank(model, model.config, data.manifest, split="test", lang=lang,
                             config=RerankConfig(k_test=rerank_k))
        out["rerank_mean_recall"] = rr["metrics"]["mean_recall"]
        out["rerank_gain"] = rr["metrics"]["mean_recall"] - rr["itc_metrics"]["mean_recall"]
    if zero_shot:
        zs = evaluate_zero_shot(model, model.config, data.zero_shot["images"], data.zero_shot[f"classnames_{lang}"],
                                data.zero_shot[f"templates_{lang}"], lang=lang)
        out["zero_shot_top1"] = zs["metrics"]["acc1"]
    return out


def params_of(ckpt: dict[str, Any]) -> int:
    return int(sum(v.numel() for v in ckpt["model"].values() if getattr(v, "is_floating_point", lambda: False)()))


# ------------------------------------------------------------------------------------------------ tables


def lookup(row: dict[str, Any], path: str) -> Any:
    """``row[a][b]`` for the path ``a.b`` (one level; the inner key may hold ``.`` and ``/``); None when missing."""
    value: Any = row
    for part in path.split(".", 1):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def markdown(rows: list[dict[str, Any]], keys: list[str], columns: list[tuple[str, str]], digits: int = 3) -> str:
    """A markdown table: the ``keys`` columns as they are, then ``mean ± ci95`` of each (path, title) column."""
    lines = ["| " + " | ".join(keys + [title for _, title in columns]) + " |",
             "|" + "---|" * len(keys) + "---:|" * len(columns)]
    for row in rows:
        cells = [str(row[k]) for k in keys]
        for path, _ in columns:
            cell = lookup(row, path)
            cells.append(fmt(cell, 0 if path.endswith("wall_s") else digits) if isinstance(cell, dict) else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ command line


def parser(description: str, out: str, seeds: int = 3) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(RESULTS / out), help="results folder (runs/, <name>.json, plots)")
    p.add_argument("--data-root", default=str(ROOT / "data" / "01_raw" / "experiments"),
                   help="where the corpora are generated")
    p.add_argument("--seeds", nargs="+", type=int, default=list(range(seeds)))
    p.add_argument("--plot-only", action="store_true", help="redraw the summary and plots from the cached runs")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--demo", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="DemoConfig fields for every corpus (e.g. n_train=200 for a quick look; results are then "
                        "not the documented ones)")
    return p


def setup(args: argparse.Namespace) -> None:
    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("vlalign", "kedro", "great_expectations"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    DEMO_OVERRIDES.clear()
    for item in args.demo:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--demo {item!r}: expected FIELD=VALUE with a DemoConfig field, e.g. n_train=200")
        DEMO_OVERRIDES[name] = yaml.safe_load(value)


def experiment_config(args: argparse.Namespace, recipes: Iterable[str], **fields: Any) -> dict[str, Any]:
    """What decides an experiment's runs: its own settings, its recipes' definitions, the corpus overrides."""
    return {**fields, "recipes": recipe_digest(recipes), "demo": dict(DEMO_OVERRIDES)}


def figure(ncols: int, width: float = 4.6, height: float = 3.8):
    from vlalign.eval.calibration import agg_figure

    fig = agg_figure(figsize=(width * ncols, height))
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def errorbar_lines(ax, xs: list[Any], series: dict[str, list[dict[str, Any] | None]], xlabel: str, ylabel: str,
                   log_x: bool = False, chance: float | None = None) -> None:
    """One line per series, each point its mean with the 95 % interval as an error bar."""
    for label, cells in series.items():
        pts = [(x, c) for x, c in zip(xs, cells) if c]
        if not pts:
            continue
        ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts], yerr=[p[1]["ci95"] for p in pts], marker="o",
                    capsize=3, label=label)
    if chance is not None:
        ax.axhline(chance, color="grey", ls=":", lw=1, label="chance")
    if log_x:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
