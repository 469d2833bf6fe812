"""CapFilt (BLIP §3.3): caption the training images, filter original and synthetic captions with the ITM head.

The captioner (the fusion model's caption decoder) writes ``synthetic_per_image`` captions for every training image
by nucleus sampling; the ITM head scores every (image, caption) pair, original and synthetic, as a probability of a
match; pairs below the threshold are dropped. The kept pairs form the filtered manifest (the manifest columns of
INTERFACES §1 plus ``capfilt_origin`` = original | synthetic and ``itm_score``), which the pipeline writes as shards
for the next stage. :func:`capfilt_report` counts kept and dropped pairs per origin with examples, and
:func:`capfilt_html` renders them with thumbnails.

**The threshold is calibrated** (``calibration: validation``, the default): it is the ITM score that keeps
``keep_validation`` (0.95) of the validation split's own pairs (:func:`calibrate`), not BLIP's fixed 0.5
(``calibration: none`` with ``threshold: 0.5``). An ITM head's probabilities carry the prior it was trained with
(one positive per two hard negatives: a true pair's odds are divided by ~2) and, where different images share
captions as they do in templated or web data, hard "negatives" that are true descriptions push every true pair
further down; on the built-in data after the ``blip`` recipe's stage 2 a true pair averages 0.42, so a fixed 0.5
dropped 82 % of correct captions. Ranking by the score still separates matched from mismatched pairs (ROC AUC,
benchmarks/experiments/noise.py); the calibration decides where to cut from data the filter did not train on. With
``keep_best_per_image`` (default) an image whose every caption falls below the threshold keeps its best-scoring
one, so the filter never removes an image from the corpus.

Pairs are scored with the per-image K/V cache of :mod:`vlalign.eval.rerank`: an image's cross-attention keys and
values are computed once for all its captions. Images are read only through :mod:`vlalign.data.images`.
"""

from __future__ import annotations

import base64
import html
import io
import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from vlalign.data.synthetic import CaptionerContext, register_captioner
from vlalign.errors import ConfigError, DatasetFormatError, dataclass_from_mapping

ORIGINS = ("original", "synthetic")
CALIBRATIONS = ("validation", "none")
_CJK = "\u3000-\u303f\u4e00-\u9fff\uff00-\uffef"  # CJK ideographs, symbols and full-width punctuation


@dataclass
class CapFiltConfig:
    """The ``capfilt`` section of a recipe (``training.recipes.<name>.capfilt``)."""

    after: str = "stage2"  # the stage whose captioner and ITM head bootstrap the corpus (its final checkpoint)
    synthetic_per_image: int = 1  # captions sampled per training image
    top_p: float = 0.9  # nucleus sampling mass (BLIP: 0.9)
    temperature: float = 1.0  # softmax temperature of the sampler
    max_length: int = 20  # tokens of a synthetic caption at most, [CLS] and [SEP] included
    min_length: int = 5  # tokens before [SEP] may be sampled
    calibration: str = "validation"  # validation: the threshold keeps keep_validation of the val split's pairs;
    #                                  none: the fixed `threshold` (BLIP: 0.5)
    keep_validation: float = 0.95  # fraction of the validation pairs (true by construction) the threshold keeps
    threshold: float = 0.5  # ITM probability of a match below which a pair is dropped (calibration: none)
    drop_quantile: float | None = None  # instead: drop this lowest fraction of the training scores
    keep_best_per_image: bool = True  # an image with no caption above the threshold keeps its best-scoring one
    batch_size: int = 64  # images captioned and scored at once
    seed: int = 0  # seed of the sampler
    examples: int = 6  # kept and dropped examples per origin in the report
    thumbnail: int = 64  # side of the report's thumbnails in pixels

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.synthetic_per_image, int) and self.synthetic_per_image >= 0, "synthetic_per_image",
             "an integer >= 0"),
            (0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]"),
            (self.temperature > 0, "temperature", "> 0"),
            (isinstance(self.max_length, int) and self.max_length >= 3, "max_length", "an integer >= 3"),
            (isinstance(self.min_length, int) and 1 <= self.min_length < self.max_length, "min_length",
             "an integer in [1, max_length)"),
            (0.0 <= self.threshold < 1.0, "threshold", "a probability in [0, 1)"),
            (self.calibration in CALIBRATIONS, "calibration", f"one of {list(CALIBRATIONS)}"),
            (0.0 < self.keep_validation <= 1.0, "keep_validation", "a fraction in (0, 1]"),
            (isinstance(self.keep_best_per_image, bool), "keep_best_per_image", "true or false"),
            (self.drop_quantile is None or 0.0 <= self.drop_quantile < 1.0, "drop_quantile", "null or in [0, 1)"),
            (isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", "a positive integer"),
            (isinstance(self.examples, int) and self.examples >= 0, "examples", "an integer >= 0"),
            (isinstance(self.thumbnail, int) and self.thumbnail >= 8, "thumbnail", "an integer >= 8"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ConfigError(f"capfilt.{name}={getattr(self, name)!r}: expected {expected} (the recipe's capfilt section).")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str = "capfilt") -> CapFiltConfig:
        """From a recipe's ``capfilt`` mapping, naming unknown keys."""
        return dataclass_from_mapping(cls, data, where, "key(s)")


def caption_text(tokenizer: Any, ids: list[int]) -> str:
    """Token ids -> caption text: special tokens dropped, WordPiece joined (a stray ``##`` piece becomes a word), no
    spaces between CJK characters."""
    text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
    text = re.sub(r"(^|\s)##", r"\1", text)  # a word-piece continuation with no word before it starts a word
    text = re.sub(rf"(?<=[{_CJK}])\s+(?=[{_CJK}])", "", text)
    return re.sub(r"\s+", " ", text).strip()


def caption_lang(text: str) -> str:
    """``zh`` when the caption has a CJK ideograph, else ``en``."""
    return "zh" if re.search(r"[\u4e00-\u9fff]", text) else "en"


def _pixels(rows: pd.DataFrame, transform: Any) -> torch.Tensor:
    from vlalign.data.images import ImageAccessError, decode_roots, open_image

    images = []
    for path, root, source in zip(rows["image_path"], rows["image_root"], rows.get("source", rows["image_path"])):
        try:
            images.append(transform(open_image(path, decode_roots(root))))
        except ImageAccessError as exc:
            raise DatasetFormatError(f"{source}: {exc} CapFilt reads the training images; re-run validation.") from exc
    return torch.stack(images)  # (b, 3, H, W)


def _banned_tokens(tokenizer: Any) -> list[int]:
    return sorted({tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.mask_token_id, tokenizer.unk_token_id})


@torch.no_grad()
def sample_captions(model: nn.Module, tokenizer: Any, chunk: pd.DataFrame, pixels: torch.Tensor,
                    image_tokens: torch.Tensor, config: CapFiltConfig, generator: torch.Generator,
                    banned: list[int] | None = None) -> list[dict[str, Any]]:
    """``config.synthetic_per_image`` captions per image of ``chunk`` (one row per image; ``pixels`` (b, 3, H, W)
    and ``image_tokens`` (b, T, C) in the same order), sampled by the caption decoder with nucleus sampling: one
    manifest-like dict per non-empty caption (``capfilt_origin`` synthetic, ``lang`` from the text)."""
    repeat = config.synthetic_per_image
    banned = _banned_tokens(tokenizer) if banned is None else banned
    ids = model.generate(pixels.repeat_interleave(repeat, 0), tokenizer.cls_token_id, tokenizer.sep_token_id,
                         tokenizer.pad_token_id, banned, config.max_length, config.min_length, config.top_p,
                         config.temperature, generator, image_tokens.repeat_interleave(repeat, 0))
    synthetic = []
    for k, row in enumerate(ids.tolist()):
        first = chunk.iloc[k // repeat]
        text = caption_text(tokenizer, row)
        if not text:
            continue  # an empty sample (only special tokens) is no caption
        synthetic.append({**{c: first[c] for c in ("image_id", "image_path", "image_root", "split")},
                          "caption": text, "lang": caption_lang(text),
                          "caption_id": f"capfilt:{first['image_id']}:{k % repeat}",
                          "source": f"capfilt synthetic caption {k % repeat} of image {first['image_id']}",
                          "capfilt_origin": "synthetic"})
    return synthetic


@torch.no_grad()
def score_pairs(model: nn.Module, cfg: Any, rows: pd.DataFrame, config: CapFiltConfig,
                synthetic: bool = True) -> pd.DataFrame:
    """Every (image, caption) pair of ``rows`` (and, with ``synthetic``, of the captions sampled for their images) with
    ``capfilt_origin`` and ``itm_score`` (probability of a match), images in first-seen order."""
    from vlalign.data.tokenizers import tokenize
    from vlalign.data.transforms import build_transform
    from vlalign.eval.rerank import has_itm_head, pair_scores_cached
    from vlalign.models.towers import build_tokenizer_for

    if not has_itm_head(model) or getattr(model, "decoder", None) is None:
        raise ConfigError(f"CapFilt needs a fusion model with a caption decoder and an ITM head; the checkpoint's model "
                          f"{cfg.name!r} (arch {cfg.arch!r}) lacks one. Run it after a `blip` stage (recipe blip).")
    if rows.empty:
        raise DatasetFormatError("CapFilt: no rows to score.")
    was_training = model.training
    model.eval()
    tokenizer = build_tokenizer_for(cfg)
    transform = build_transform(cfg, train=False)
    banned = _banned_tokens(tokenizer)
    generator = torch.Generator().manual_seed(config.seed)
    firsts = rows.drop_duplicates("image_id")
    groups = rows.groupby("image_id", sort=False).indices
    scored = []
    for start in range(0, len(firsts), config.batch_size):
        chunk = firsts.iloc[start:start + config.batch_size]
        pixels = _pixels(chunk, transform)  # (b, 3, H, W)
        image_tokens = model.image_outputs(pixels)[0]  # (b, T, C)
        frame = pd.concat([rows.iloc[groups[i]] for i in chunk["image_id"]]).assign(capfilt_origin="original")
        if synthetic and config.synthetic_per_image:
            sampled = sample_captions(model, tokenizer, chunk, pixels, image_tokens, config, generator, banned)
            frame = pd.concat([frame, pd.DataFrame(sampled)], ignore_index=True)
        text = tokenize(tokenizer, frame["caption"].tolist(), cfg.text.context_length)
        states = model.text_outputs(text["input_ids"], text["attention_mask"])[0]  # (n, L, H)
        local = {image_id: k for k, image_id in enumerate(chunk["image_id"])}
        pairs = torch.stack([torch.tensor([local[i] for i in frame["image_id"]]), torch.arange(len(frame))], dim=1)
        log_odds = pair_scores_cached(model, image_tokens, states, text["attention_mask"], pairs, 256)
        frame["itm_score"] = torch.sigmoid(log_odds).numpy().astype(float)  # softmax(logits)[match]
        scored.append(frame)
    model.train(was_training)
    return pd.concat(scored, ignore_index=True)


def calibrate(model: nn.Module, cfg: Any, validation: pd.DataFrame | None, config: CapFiltConfig) -> dict[str, Any] | None:
    """With ``calibration: validation``: the threshold that keeps ``keep_validation`` of the ``validation`` rows' own
    (image, caption) pairs, their (1 − keep) score quantile, with what it was computed from; None otherwise (a fixed
    ``threshold`` or ``drop_quantile``)."""
    if config.calibration != "validation" or config.drop_quantile is not None:
        return None
    if validation is None or validation.empty:
        raise DatasetFormatError("CapFilt: calibration: validation needs the validation split's pairs, and the corpus has "
                                 "none (split == 'val'). Add a val split, or set the recipe's capfilt.calibration: none "
                                 "with a fixed capfilt.threshold.")
    scores = score_pairs(model, cfg, validation, config, synthetic=False)["itm_score"].to_numpy()
    threshold = float(np.quantile(scores, 1.0 - config.keep_validation, method="lower"))
    return {"split": "val", "pairs": int(len(scores)), "keep": config.keep_validation, "threshold": threshold,
            "mean_itm_score": float(scores.mean()), "kept_fraction": float((scores >= threshold).mean())}


def run_capfilt(model: nn.Module, cfg: Any, rows: pd.DataFrame, config: CapFiltConfig,
                calibration: dict[str, Any] | None = None) -> pd.DataFrame:
    """Every (image, caption) pair of the training ``rows`` and of the sampled captions (:func:`score_pairs`), with
    ``kept`` (score >= the threshold: the ``calibration``'s, else :func:`effective_threshold`) and ``rescued`` (kept
    only because it is its image's best caption, ``keep_best_per_image``)."""
    if config.calibration == "validation" and config.drop_quantile is None and calibration is None:
        raise ConfigError("CapFilt: calibration: validation needs the calibration of vlalign.data.capfilt.calibrate "
                          "(the validation pairs' scores); pass it, or set calibration: none.")
    result = score_pairs(model, cfg, rows, config)
    result["kept"] = result["itm_score"] >= effective_threshold(result["itm_score"], config, calibration)
    result["rescued"] = False
    if config.keep_best_per_image:
        best = result.groupby("image_id", sort=False)["itm_score"].idxmax()  # each image's best-scoring pair
        lost = ~result.groupby("image_id", sort=False)["kept"].any()
        rescue = best[lost[lost].index].to_numpy()
        result.loc[rescue, "kept"] = True
        result.loc[rescue, "rescued"] = True
    return result


def effective_threshold(scores: pd.Series, config: CapFiltConfig, calibration: dict[str, Any] | None = None) -> float:
    """With ``drop_quantile`` q the q-quantile of the scores (the lowest fraction q is dropped); else the
    calibrated threshold when there is a ``calibration``; else the fixed ``threshold``."""
    if config.drop_quantile is not None:
        return float(np.quantile(scores.to_numpy(), config.drop_quantile))
    if calibration is not None:
        return float(calibration["threshold"])
    return config.threshold


def filtered_manifest(scored: pd.DataFrame, config: CapFiltConfig) -> pd.DataFrame:
    """The kept pairs (manifest columns + ``capfilt_origin``, ``itm_score``); a ConfigError when nothing is kept."""
    kept = scored[scored["kept"]].drop(columns=["kept", "rescued"], errors="ignore").reset_index(drop=True)
    if kept.empty:
        raise ConfigError(f"CapFilt kept no pair: every ITM score is below the threshold {config.threshold} (highest "
                          f"{scored['itm_score'].max():.3f}). Train the filtering stage {config.after!r} longer or "
                          "lower training.recipes.<recipe>.capfilt.threshold.")
    return kept


def capfilt_report(scored: pd.DataFrame, config: CapFiltConfig,
                   calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """Counts of kept and dropped pairs per origin, images that lost every caption (or kept only their best one),
    the threshold and its calibration, and seeded examples of each (image path and root, caption, score), for the
    JSON report and :func:`capfilt_html`."""
    rng = np.random.default_rng(config.seed)
    per_origin: dict[str, Any] = {}
    for origin in ORIGINS:
        part = scored[scored["capfilt_origin"] == origin]
        examples = {}
        for label, subset in (("kept", part[part["kept"]]), ("dropped", part[~part["kept"]])):
            take = rng.choice(len(subset), size=min(config.examples, len(subset)), replace=False) if len(subset) else []
            picked = subset.iloc[sorted(take)].sort_values("itm_score", ascending=(label == "dropped"))
            examples[label] = [{"image_id": str(r.image_id), "image_path": str(r.image_path),
                                "image_root": str(r.image_root), "caption": str(r.caption), "lang": str(r.lang),
                                "itm_score": float(r.itm_score)} for r in picked.itertuples()]
        per_origin[origin] = {"pairs": int(len(part)), "kept": int(part["kept"].sum()),
                              "dropped": int((~part["kept"]).sum()),
                              "kept_fraction": float(part["kept"].mean()) if len(part) else 0.0,
                              "mean_itm_score": float(part["itm_score"].mean()) if len(part) else 0.0,
                              "examples": examples}
    images = scored.groupby("image_id", sort=False)["kept"].any()
    rescued = scored["rescued"] if "rescued" in scored else pd.Series(False, index=scored.index)
    return {"config": asdict(config), "threshold": effective_threshold(scored["itm_score"], config, calibration),
            "calibration": calibration, "n_images": int(len(images)), "images_kept": int(images.sum()),
            "images_without_caption": int((~images).sum()), "images_rescued": int(rescued.sum()),
            "pairs": int(len(scored)), "pairs_kept": int(scored["kept"].sum()), "per_origin": per_origin}


def _thumbnail(path: str, root: str, side: int) -> str:
    """A data URI of the image as a PNG thumbnail (read inside its roots)."""
    from vlalign.data.images import decode_roots, open_image

    image = open_image(path, decode_roots(root)).convert("RGB")
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _threshold_origin(report: dict[str, Any]) -> str:
    config, calibration = report["config"], report.get("calibration")
    if config["drop_quantile"] is not None:
        return f" (the {config['drop_quantile']} quantile of the scores). "
    if calibration:
        return (f" (calibrated: it keeps {100 * calibration['kept_fraction']:.1f} % of the {calibration['pairs']} "
                f"validation pairs, whose mean score is {calibration['mean_itm_score']:.3f}). ")
    return " (fixed). "


def capfilt_html(report: dict[str, Any], title: str = "CapFilt report") -> str:
    """A self-contained HTML page: kept/dropped counts per origin, then kept and dropped examples with thumbnails."""
    config = report["config"]
    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>",
            f"<p>Captioner and filter: the final checkpoint of stage <b>{esc(str(config['after']))}</b>. "
            f"{config['synthetic_per_image']} synthetic caption(s) per image by nucleus sampling (top_p "
            f"{config['top_p']}); a pair is kept when the ITM probability of a match is at least "
            f"{report['threshold']:.4g}" + _threshold_origin(report)
            + f"{report['images_kept']} of {report['n_images']} images keep at least one caption"
            + (f" ({report.get('images_rescued', 0)} only their best-scoring one); " if config.get("keep_best_per_image")
               else "; ")
            + f"{report['pairs_kept']} of {report['pairs']} pairs are kept.</p>",
            "<table><tr><th>Origin</th><th>Pairs</th><th>Kept</th><th>Dropped</th><th>Kept %</th>"
            "<th>Mean ITM score</th></tr>"]
    for origin, stats in report["per_origin"].items():
        body.append(f"<tr><td>{origin}</td><td>{stats['pairs']}</td><td>{stats['kept']}</td><td>{stats['dropped']}</td>"
                    f"<td>{100 * stats['kept_fraction']:.1f}</td><td>{stats['mean_itm_score']:.3f}</td></tr>")
    body.append("</table>")
    for origin, stats in report["per_origin"].items():
        for label in ("kept", "dropped"):
            rows = stats["examples"][label]
            body.append(f"<h2>{origin} captions, {label} ({stats[label]} in all; {len(rows)} examples)</h2>")
            if not rows:
                body.append("<p>none</p>")
                continue
            body.append("<table><tr><th>Image</th><th>Caption</th><th>ITM score</th></tr>")
            for row in rows:
                uri = _thumbnail(row["image_path"], row["image_root"], int(config["thumbnail"]))
                body.append(f'<tr class="{label}"><td><img alt="image {esc(row["image_id"])}" src="{uri}"></td>'
                            f"<td>{esc(row['caption'])}</td><td>{row['itm_score']:.3f}</td></tr>")
            body.append("</table>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{esc(title)}</title>\n<style>body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; }}"
            " table { border-collapse: collapse; margin: 1em 0; } th, td { border: 1px solid #bbb; padding: 0.3em 0.8em; }"
            " tr.dropped td { color: #933; }</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


@register_captioner("blip")
def blip_captioner(rows: pd.DataFrame, options: dict[str, Any], context: CaptionerContext) -> pd.DataFrame:
    """A trained BLIP captioner (a fusion checkpoint with a caption decoder, e.g. a `blip` recipe's stage 2) writes the
    synthetic captions by nucleus sampling, as CapFilt's captioner does. The checkpoint comes from the recipe's
    ``synthetic.checkpoint`` (a file) or ``synthetic.checkpoint_stage``. Options: ``captions_per_image`` (default 2),
    ``top_p``, ``temperature``, ``max_length``, ``min_length``, ``batch_size`` (as in the ``capfilt`` section)."""
    from vlalign.data.transforms import build_transform
    from vlalign.models.towers import build_tokenizer_for
    from vlalign.train.checkpoint import model_from_checkpoint

    sampler = {"top_p", "temperature", "max_length", "min_length", "batch_size"}
    unknown = sorted(set(options) - sampler - {"captions_per_image"})
    if unknown:
        raise ConfigError(f"synthetic.options: unknown option(s) {unknown} of the blip captioner; allowed are "
                          f"{sorted(sampler | {'captions_per_image'})}.")
    if context.checkpoint is None:
        raise ConfigError("synthetic.captioner=blip needs a trained BLIP model: set the recipe's synthetic.checkpoint "
                          "to its final.pt (e.g. data/runs/local/blip/06_models/stage2/final.pt, after `kedro run "
                          "--params training.recipe=blip`) or synthetic.checkpoint_stage to a stage of this recipe.")
    model = model_from_checkpoint(context.checkpoint).eval()
    cfg = model.config
    if getattr(model, "decoder", None) is None:
        raise ConfigError(f"synthetic.captioner=blip: the checkpoint's model {cfg.name!r} (arch {cfg.arch!r}) has no "
                          "caption decoder; use a checkpoint of the blip recipe.")
    config = CapFiltConfig(synthetic_per_image=int(options.get("captions_per_image", 2)), seed=context.seed,
                           **{k: options[k] for k in sampler if k in options})
    tokenizer = build_tokenizer_for(cfg)
    transform = build_transform(cfg, train=False)
    generator = torch.Generator().manual_seed(config.seed)
    firsts = rows.drop_duplicates("image_id")
    out = []
    for start in range(0, len(firsts), config.batch_size):
        chunk = firsts.iloc[start:start + config.batch_size]
        pixels = _pixels(chunk, transform)
        by_id = {row["image_id"]: row for row in chunk.to_dict("records")}
        for item in sample_captions(model, tokenizer, chunk, pixels, model.image_outputs(pixels)[0], config, generator):
            first = by_id[item["image_id"]]
            k = item["caption_id"].rsplit(":", 1)[1]  # the sample's number for its image
            out.append({**first, "caption": item["caption"], "lang": item["lang"],
                        "caption_id": f"syn:{item['lang']}:{item['image_id']}:{k}",
                        "source": f"synthetic:blip:{first['source']}"})
    return pd.DataFrame(out, columns=list(rows.columns))
