"""Benchmark reports (Markdown + self-contained HTML with plots) and CLIP_benchmark JSON records."""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Mapping
from numbers import Real
from pathlib import Path

from vlalign.eval.calibration import agg_figure, reliability_diagram

#: Section keys with a special meaning (see :func:`write_benchmark_report`).
RESERVED_KEYS = ("metrics", "description", "chance", "curve", "per_class_accuracy", "reliability")

#: Tasks CLIP_benchmark knows (its ``--task`` values).
CLIP_BENCHMARK_TASKS = (
    "zeroshot_classification",
    "zeroshot_retrieval",
    "linear_probe",
    "captioning",
    "image_caption_selection",
)

_DIRECTIONS = (
    ("image_retrieval_recall", "text -> image (image retrieval)"),
    ("text_retrieval_recall", "image -> text (text retrieval)"),
)


def write_benchmark_report(results: Mapping[str, Mapping], out_dir: Path, title: str) -> dict[str, Path]:
    """Write ``report.md`` and ``report.html`` (plots embedded) with the metrics beside chance.

    ``results`` maps a section name (shown as a heading, e.g. ``"retrieval"``, ``"zero_shot"``,
    ``"flickr_zh retrieval"``) to a section dict. The section's metrics (name -> number, listed in
    its table in the given order) are either

    - flat: every non-reserved key with a number value is a metric, or
    - nested: ``section["metrics"]`` holds them, as :mod:`vlalign.eval.run` returns; then every
      other non-reserved key is a detail.

    Details are non-reserved keys with a scalar value that is not a metric (``"split": "test"``,
    ``"n_images": 1000``); they are listed on one line under the heading. The other reserved
    keys, all optional, are:

    - ``"description"``: str, a paragraph under the heading (say what the numbers mean: data
      split, language, checkpoint).
    - ``"chance"``: ``{metric name: chance level}`` shown in the table's Chance column, e.g. from
      :func:`~vlalign.eval.retrieval.retrieval_chance` or :func:`~vlalign.eval.zero_shot.zero_shot_chance`.
    - ``"curve"``: ``{"k": [...], "image_retrieval_recall": [...], "text_retrieval_recall": [...]}``
      from :func:`~vlalign.eval.retrieval.recall_curve`: plotted as recall@K curves for both
      directions; chance values ``image_retrieval_recall@k`` / ``text_retrieval_recall@k`` found
      in ``"chance"`` are drawn as dashed lines (pass chance for ks=range(1, max_k + 1) for a
      full chance curve).
    - ``"per_class_accuracy"``: ``{class name: accuracy}`` (NaN = class absent), plotted as a
      sorted bar chart (see :func:`~vlalign.eval.zero_shot.per_class_accuracy`).
    - ``"reliability"``: the dict of :func:`~vlalign.eval.calibration.expected_calibration_error`,
      plotted as a reliability diagram; its ``ece`` joins the table unless already a metric.

    For example::

        {"retrieval": {"image_retrieval_recall@1": 0.41, ..., "mean_recall": 0.62, "rsum": 372.1,
                       "chance": {...}, "curve": {...}},
         "zero_shot": {"acc1": 0.55, "acc5": 0.91, "mean_per_class_recall": 0.54,
                       "chance": {...}, "per_class_accuracy": {"red circle": 0.8, ...},
                       "reliability": {...}}}

    Args:
        results: the sections, as above.
        out_dir: folder to write into (created if needed); plots go to ``out_dir/plots/``.
        title: the report's title.

    Returns:
        ``{"markdown": report.md, "html": report.html}`` plus one entry per plot, keyed
        ``"<section>:recall_curve"``, ``"<section>:reliability"`` or ``"<section>:per_class_accuracy"``.
        The Markdown references the PNGs by relative path; the HTML embeds them (base64), so it
        can be moved or attached on its own.
    """
    _validate_results(results)
    out_dir = Path(out_dir)
    plot_dir = out_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    md = [f"# {title}", ""]
    body = [f"<h1>{html.escape(title)}</h1>"]
    for index, (name, section) in enumerate(results.items()):
        prefix = f"{index:02d}_{_slug(name)}"
        rows = _table_rows(section)
        md += [f"## {name}", ""]
        body.append(f"<h2>{html.escape(name)}</h2>")
        if section.get("description"):
            md += [str(section["description"]), ""]
            body.append(f"<p>{html.escape(str(section['description']))}</p>")
        details = "; ".join(f"{key}: {value}" for key, value in _details(section).items())
        if details:
            md += [f"*{details}*", ""]
            body.append(f"<p><em>{html.escape(details)}</em></p>")
        md += ["| Metric | Value | Chance |", "|---|---:|---:|"]
        md += [f"| {metric} | {value} | {chance} |" for metric, value, chance in rows]
        md.append("")
        body.append("<table><tr><th>Metric</th><th>Value</th><th>Chance</th></tr>")
        body += [
            f"<tr><td>{html.escape(metric)}</td><td>{value}</td><td>{chance}</td></tr>"
            for metric, value, chance in rows
        ]
        body.append("</table>")
        for kind, path in _plots(section, name, plot_dir, prefix):
            written[f"{name}:{kind}"] = path
            caption = f"{name}: {kind.replace('_', ' ')}"
            md += [f"![{caption}]({path.relative_to(out_dir).as_posix()})", ""]
            encoded = base64.b64encode(path.read_bytes()).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{encoded}">'
                        f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(md), encoding="utf-8")
    html_path = out_dir / "report.html"
    html_path.write_text(_HTML_PAGE.format(title=html.escape(title), body="\n".join(body)), encoding="utf-8")
    return {"markdown": md_path, "html": html_path, **written}


def clip_benchmark_record(
    dataset: str,
    model: str,
    task: str,
    metrics: Mapping[str, float],
    language: str,
    pretrained: str | None = None,
) -> dict:
    """One result in CLIP_benchmark's output shape, so its ``clip_benchmark build`` tooling reads it.

    Returns ``{"dataset", "model", "pretrained", "task", "metrics", "language"}``, with
    ``"pretrained"`` (the checkpoint name) only when given. ``task`` must be a CLIP_benchmark task
    (:data:`CLIP_BENCHMARK_TASKS`); ``metrics`` values must be numbers (pass the metrics only, not
    a report section with its ``chance`` or ``curve`` entries).
    """
    if task not in CLIP_BENCHMARK_TASKS:
        raise ValueError(f"task {task!r} is not a CLIP_benchmark task; use one of {list(CLIP_BENCHMARK_TASKS)}.")
    bad = [key for key, value in metrics.items() if not _is_number(value)]
    if bad:
        raise ValueError(
            f"metrics[{bad[0]!r}] is {type(metrics[bad[0]]).__name__}, not a number; pass only the "
            "metric values (drop 'chance', 'curve' and other report entries)."
        )
    record: dict = {"dataset": dataset, "model": model}
    if pretrained is not None:
        record["pretrained"] = pretrained
    record.update(task=task, metrics={key: float(value) for key, value in metrics.items()}, language=language)
    return record


# ----------------------------------------------------------------------------- internals

_HTML_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #bbb; padding: 0.3em 0.8em; }}
td:nth-child(n+2) {{ text-align: right; font-family: monospace; }}
img {{ max-width: 100%; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""


def _is_number(value: object) -> bool:
    """True for real numbers (int, float, numpy scalars), False for bools and everything else."""
    return isinstance(value, Real) and not isinstance(value, bool)


def _fmt(value: float) -> str:
    """Four decimals for fractions, two for larger numbers such as rsum."""
    value = float(value)
    if math.isnan(value):
        return "nan"
    return f"{value:.2f}" if abs(value) >= 10 else f"{value:.4f}"


def _slug(name: str) -> str:
    """A file-name-safe form of a section name."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "section"


def _validate_results(results: Mapping[str, Mapping]) -> None:
    """Check the shape documented in :func:`write_benchmark_report`, naming the offending entry."""
    if not isinstance(results, Mapping) or not results:
        raise ValueError("results must be a non-empty mapping of section name -> section dict.")
    for name, section in results.items():
        if not isinstance(section, Mapping):
            raise ValueError(f"results[{name!r}] must be a dict of metrics, got {type(section).__name__}.")
        for key, value in section.items():
            if key not in RESERVED_KEYS and not isinstance(value, (str, Real)):
                raise ValueError(
                    f"results[{name!r}][{key!r}] is {type(value).__name__}; outside the reserved keys "
                    f"{list(RESERVED_KEYS)} a section holds only numbers (metrics) and strings (details)."
                )
        metrics = _metrics(section)
        if not isinstance(metrics, Mapping) or not all(_is_number(v) for v in metrics.values()):
            raise ValueError(f"results[{name!r}]['metrics'] must map metric names to numbers.")
        reliability = section.get("reliability")
        if reliability is not None and not (isinstance(reliability, Mapping) and "ece" in reliability):
            raise ValueError(
                f"results[{name!r}]['reliability'] must be the dict returned by expected_calibration_error."
            )
        curve = section.get("curve")
        if curve is not None:
            lengths = {key: len(curve.get(key, ())) for key in ("k", *(d for d, _ in _DIRECTIONS))}
            if len(set(lengths.values())) != 1 or not lengths["k"]:
                raise ValueError(
                    f"results[{name!r}]['curve'] needs equally long, non-empty 'k', "
                    f"'image_retrieval_recall' and 'text_retrieval_recall' lists; got lengths {lengths}."
                )


def _metrics(section: Mapping) -> Mapping:
    """The section's metrics: ``section["metrics"]`` if present, else its numeric non-reserved keys."""
    if "metrics" in section:
        return section["metrics"]
    return {key: value for key, value in section.items() if key not in RESERVED_KEYS and _is_number(value)}


def _details(section: Mapping) -> dict:
    """The section's non-reserved entries that are not metrics (split, language, counts, ...)."""
    nested = "metrics" in section
    return {
        key: value for key, value in section.items()
        if key not in RESERVED_KEYS and (nested or not _is_number(value))
    }


def _table_rows(section: Mapping) -> list[tuple[str, str, str]]:
    """(metric, value, chance) strings for the section's table."""
    chance = section.get("chance", {})
    metrics = dict(_metrics(section))
    if "reliability" in section and "ece" not in metrics:
        metrics["ece"] = section["reliability"]["ece"]
    return [
        (key, _fmt(value), _fmt(chance[key]) if key in chance else "-")
        for key, value in metrics.items()
    ]


def _plots(section: Mapping, name: str, plot_dir: Path, prefix: str) -> list[tuple[str, Path]]:
    """Draw the section's plots; return (kind, path) pairs in display order."""
    plots = []
    if "curve" in section:
        path = plot_dir / f"{prefix}_recall_curve.png"
        _recall_curve_plot(section["curve"], section.get("chance", {}), name, path)
        plots.append(("recall_curve", path))
    if "reliability" in section:
        path = plot_dir / f"{prefix}_reliability.png"
        reliability_diagram(section["reliability"], path, title=f"{name}: reliability")
        plots.append(("reliability", path))
    if "per_class_accuracy" in section:
        path = plot_dir / f"{prefix}_per_class_accuracy.png"
        _per_class_plot(section["per_class_accuracy"], name, path)
        plots.append(("per_class_accuracy", path))
    return plots


def _recall_curve_plot(curve: Mapping, chance: Mapping, name: str, path: Path) -> None:
    """Recall@K for K = 1..max in both directions, chance dashed where known."""
    fig = agg_figure(figsize=(6.0, 4.0))
    ax = fig.subplots()
    for (direction, label), color in zip(_DIRECTIONS, ("tab:blue", "tab:orange")):
        ax.plot(curve["k"], curve[direction], color=color, label=label)
        chance_k = sorted(
            int(key.rsplit("@", 1)[1]) for key in chance if key.startswith(f"{direction}@")
        )
        if chance_k:
            ax.plot(chance_k, [chance[f"{direction}@{k}"] for k in chance_k], color=color,
                    linestyle="--", marker="." if len(chance_k) < 20 else None, label=f"{label}, chance")
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(1, max(curve["k"]))
    ax.grid(alpha=0.3)
    ax.set_title(f"{name}: recall@K")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)


def _per_class_plot(per_class: Mapping[str, float], name: str, path: Path) -> None:
    """Per-class accuracy, sorted best first; class names shown up to 60 classes."""
    items = sorted(
        ((cls, float(acc)) for cls, acc in per_class.items() if not math.isnan(float(acc))),
        key=lambda item: -item[1],
    )
    fig = agg_figure(figsize=(max(6.0, min(0.25 * len(items), 16.0)), 4.5))
    ax = fig.subplots()
    ax.bar(range(len(items)), [acc for _, acc in items], color="tab:green", edgecolor="black")
    if len(items) <= 60:
        ax.set_xticks(range(len(items)), [cls for cls, _ in items], rotation=90, fontsize="small")
    else:
        ax.set_xticks([])
        ax.set_xlabel(f"{len(items)} classes, sorted by accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("top-1 accuracy")
    ax.set_title(f"{name}: per-class accuracy")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
