"""Evaluation nodes: retrieval (multi-caption protocol, per language), zero-shot classification and the
compositional probe, beside chance; the report and CLIP_benchmark result records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from vlalign.data.formats import AUTO, resolve_lang, resolve_langs
from vlalign.errors import ConfigError
from vlalign.eval.probe import compositional_pairs, compositional_probe
from vlalign.eval.report import clip_benchmark_record, write_benchmark_report
from vlalign.eval.rerank import RerankConfig, evaluate_rerank, has_itm_head
from vlalign.eval.run import evaluate_retrieval, evaluate_zero_shot
from vlalign.tracking.hashing import evaluation_data_identity
from vlalign.tracking.mlflow import log_artifact, log_metrics
from vlalign.train import model_from_checkpoint
from vlalign.train.checkpoint import as_checkpoint


SUMMARY_KEYS = ("dataset", "split", "language", "n_images", "n_captions", "n_classes", "n_templates",
                "n_pairs", "n_pairs_per_attribute", "k_test", "score", "itm_weight", "itm_weight_from",
                "itm_weight_scores", "metrics", "itc_metrics", "chance", "ratio_to_chance", "calibration")


def build_probe_pairs(probe_source: dict[str, Any], manifest: pd.DataFrame, params: dict[str, Any]) -> list[list[str]]:
    """Compositional-probe pairs ``[image_path, true caption, swapped caption, attribute, image_root]`` for the
    validated images of the evaluation split; ``[]`` when the corpus stores no per-image ``attributes`` (real
    datasets)."""
    rows = manifest[manifest["split"] == params["split"]].drop_duplicates("image_path")
    image_paths = {Path(p).name: (p, r) for p, r in zip(rows["image_path"], rows["image_root"])}
    probe = params.get("probe") or {}
    pairs = compositional_pairs(probe_source or {}, image_paths, split=params["split"],
                                attributes=tuple(probe.get("attributes", ("colour", "shape", "position"))),
                                seed=int(probe.get("seed", 0)))
    return [list(pair) for pair in pairs]


def evaluate_model(
    checkpoint: dict[str, Any],
    manifest: pd.DataFrame,
    zero_shot_set: dict[str, Any],
    probe_pairs: list[list[str]],
    params: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return metrics.json (every metric beside its chance level and ratio to chance) and the details
    behind the report (recall@K curves, per-class accuracy, reliability-diagram data)."""
    checkpoint = as_checkpoint(checkpoint)
    model = model_from_checkpoint(checkpoint).eval()
    blocks: dict[str, dict[str, Any]] = {}
    primary = resolve_lang(params["lang"], manifest, params["split"], "evaluation.lang")
    extra = resolve_langs(params.get("extra_retrieval_langs", []), manifest, params["split"], exclude=[primary])
    for lang in [primary, *extra]:
        key = "retrieval" if lang == primary else f"retrieval_{lang}"
        blocks[key] = evaluate_retrieval(model, model.config, manifest, split=params["split"], lang=lang,
                                         batch_size=params["batch_size"], chunk_size=params["chunk_size"])
        blocks[key]["dataset"] = params["retrieval_dataset"]
    if params.get("rerank") and has_itm_head(model):  # ITC top k_test re-scored by the ITM head (arch fusion)
        blocks["itm_rerank"] = evaluate_rerank(model, model.config, manifest, split=params["split"], lang=primary,
                                               config=RerankConfig.from_dict(params["rerank"]),
                                               batch_size=params["batch_size"])
        blocks["itm_rerank"]["dataset"] = params["retrieval_dataset"]
    lang = primary if params["zero_shot_lang"] == AUTO else params["zero_shot_lang"]
    if lang not in zero_shot_set["classnames"] or lang not in zero_shot_set["templates"]:
        raise ConfigError(f"evaluation.zero_shot_lang={lang!r}: the zero-shot set has class names in "
                          f"{sorted(zero_shot_set['classnames'])} and templates in {sorted(zero_shot_set['templates'])}; "
                          "add that language to the zero_shot_set catalog entry or set zero_shot_lang.")
    blocks["zero_shot"] = evaluate_zero_shot(model, model.config, zero_shot_set["images"], zero_shot_set["classnames"][lang],
                                             zero_shot_set["templates"][lang], lang=lang, batch_size=params["batch_size"],
                                             probabilities=params.get("zero_shot_probabilities", "auto"))
    blocks["zero_shot"]["dataset"] = params["zero_shot_dataset"]
    blocks["zero_shot"]["calibration"] = {"probabilities": blocks["zero_shot"]["probabilities"],
                                          "ece": blocks["zero_shot"]["reliability"]["ece"]}
    compositional = compositional_probe(model, model.config, [tuple(p) for p in probe_pairs], params["batch_size"])
    if compositional:  # skipped on corpora without per-image attributes
        blocks["compositional"] = {"dataset": params["retrieval_dataset"], "split": params["split"], "language": "en",
                                   **compositional}
    for block in blocks.values():
        block["ratio_to_chance"] = {k: v / block["chance"][k] for k, v in block["metrics"].items()
                                    if block["chance"].get(k)}
    merge = checkpoint.get("merge") or {}
    metrics = {
        "model": {"name": checkpoint["model_config"].get("name"), "merge_beta": merge.get("beta"),
                  "stage": checkpoint["stage_config"]["name"], "source": params.get("model_uri") or "merged_checkpoint"},
        **{name: {k: block[k] for k in SUMMARY_KEYS if k in block} for name, block in blocks.items()},
    }
    # What was evaluated, by content: the registry compares versions only when this hash is the same.
    metrics["evaluation_data"] = evaluation_data_identity(
        manifest, params["split"],
        retrieval={name: (b["language"], b["dataset"]) for name, b in blocks.items() if name.startswith("retrieval")},
        zero_shot={"images": zero_shot_set["images"], "classnames": zero_shot_set["classnames"][lang],
                   "templates": zero_shot_set["templates"][lang], "lang": lang, "dataset": params["zero_shot_dataset"]},
        probe_pairs=probe_pairs if "compositional" in blocks else (), probe_dataset=params["retrieval_dataset"])
    log_metrics({("test" if name == "retrieval" else name): block["metrics"] for name, block in blocks.items()})
    return metrics, blocks


def write_report(details: dict[str, Any], params: dict[str, Any]) -> dict[str, str]:
    """Markdown + HTML benchmark report with recall@K curves, reliability diagram and per-class accuracy."""
    sections = {}
    for name, block in details.items():
        if name.startswith("retrieval"):
            chance = dict(block["chance"])  # chance at every K of the curve, drawn as dashed lines
            for direction, values in block["curve_chance"].items():
                chance.update({f"{direction}@{k}": v for k, v in zip(block["curve"]["k"], values)})
            sections[f"{block['dataset']} retrieval ({block['language']}, {block['split']})"] = {
                **{k: v for k, v in block.items() if k not in ("curve_chance", "ratio_to_chance")},
                "chance": chance,
                "description": "Multi-caption protocol (Flickr30k/COCO-CN): an image counts as retrieved when any "
                "of its captions is in the top K; each caption has exactly one correct image. Ties count against "
                "the model.",
            }
        elif name == "itm_rerank":
            metrics = {f"{k} (ITM re-ranked)": v for k, v in block["metrics"].items()}
            metrics.update({f"{k} (ITC only)": v for k, v in block["itc_metrics"].items()})
            chance = {f"{k} ({kind})": v for k, v in block["chance"].items() for kind in ("ITM re-ranked", "ITC only")}
            sections[f"{block['dataset']} retrieval with ITM re-ranking ({block['language']}, {block['split']})"] = {
                "metrics": metrics, "chance": chance, "k_test": block["k_test"], "n_pairs_fused": block["n_pairs_fused"],
                "score": block.get("score"), "itm_weight": block.get("itm_weight"),
                "itm_weight_from": block.get("itm_weight_from"),
                "description": f"ITC ranks every candidate; the top {block['k_test']} of each query are re-scored by "
                + (f"w x ITM log-odds + ITC logit, w = {block.get('itm_weight')} ({block.get('itm_weight_from')})"
                   if block.get("score") == "itm+itc" else "the ITM head (log-odds of a match)")
                + ", with each image's cross-attention keys and values computed once for all its candidates. Same "
                "protocol and tie rule as the retrieval section.",
            }
        elif name == "zero_shot":
            sections[f"{block['dataset']} zero-shot ({block['language']})"] = {
                **{k: v for k, v in block.items() if k not in ("ratio_to_chance", "calibration")},
                "description": f"Prompt-template ensembling over {block['n_templates']} templates. Class probabilities "
                f"(for the ECE): {block.get('probabilities', 'softmax')}.",
            }
        elif name == "compositional":
            per_attribute = ", ".join(f"{a}: {n}" for a, n in block["n_pairs_per_attribute"].items())
            sections[f"{block['dataset']} compositional probe ({block['split']})"] = {
                **{k: v for k, v in block.items() if k not in ("ratio_to_chance", "n_pairs_per_attribute")},
                "pairs per swapped attribute": per_attribute,
                "description": "Each test image against its true caption and the same caption with one attribute "
                "(colour, shape or position) swapped: correct when the true caption is strictly more similar. "
                "Chance is 0.5.",
            }
    out_dir = Path(params["report_dir"])
    paths = write_benchmark_report(sections, out_dir, title=params.get("report_title", "vlalign benchmark report"))
    log_artifact(out_dir, "report")
    return {name: str(path) for name, path in paths.items()}


def clip_benchmark_results(metrics: dict[str, Any], params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One CLIP_benchmark result record per task and language, keyed ``<dataset>_<task>_<language>``."""
    tasks = {"zero_shot": "zeroshot_classification", "compositional": "image_caption_selection"}
    model = metrics["model"]
    records = {}
    for name, block in metrics.items():
        task = "zeroshot_retrieval" if name.startswith("retrieval") else tasks.get(name)
        if task is None:
            continue
        record = clip_benchmark_record(block["dataset"], model["name"], task, block["metrics"], block["language"],
                                       pretrained=model["source"])
        records[f"{block['dataset']}_{task}_{block['language']}"] = record
    return records
