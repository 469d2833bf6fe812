"""Calibration of class probabilities: expected calibration error and the reliability diagram.

The prediction of a sample is its arg-max class (the first one on a tie, as ``torch.argmax``) and
its confidence is that class's probability. Confidences fall into ``n_bins`` equal-width bins
(b/n, (b+1)/n] (a confidence of exactly 0 goes to the first bin), and

    ECE = sum over bins b of (count_b / N) * |accuracy_b - mean confidence_b|

(Guo et al., 2017, "On Calibration of Modern Neural Networks"; 15 bins by default, as there).
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlalign.eval.zero_shot import _validate_labels


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15,
                               normalized: bool = True) -> dict:
    """ECE of top-1 predictions, with the per-bin data of a reliability diagram.

    Args:
        probs: (N, C) class probabilities; each row must be non-negative and sum to 1 (apply
            ``softmax(logit_scale * logits)`` first; raw logits are rejected).
        labels: (N,) integer true class of each sample, in [0, C).
        n_bins: number of equal-width confidence bins over [0, 1].
        normalized: False for independent per-class probabilities, e.g. SigLIP's
            ``sigmoid(logit_scale * logits + logit_bias)``: each value must lie in [0, 1] but a row need not sum to
            1. The confidence is still the top class's probability (for a sigmoid: that the image matches it).

    Returns:
        A JSON-ready dict:
        ``ece`` (float in [0, 1]), ``accuracy`` and ``mean_confidence`` (over all samples),
        ``n_bins``, ``bin_edges`` (n_bins + 1 floats), and per bin ``bin_confidence`` (mean
        confidence), ``bin_accuracy`` (fraction correct) and ``bin_count`` (samples). An empty bin
        has count 0 and confidence and accuracy 0.0; read the last two only where the count is > 0.
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}.")
    probs = _validate_probs(probs, normalized)
    labels = _validate_labels(labels, probs.shape[1]).to(probs.device)
    if labels.shape[0] != probs.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries but probs has {probs.shape[0]} rows.")
    confidence, predicted = probs.max(dim=1)  # (N,), (N,)
    correct = (predicted == labels).double()  # (N,)
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64, device=probs.device)  # (n_bins + 1,)
    bins = torch.bucketize(confidence, edges[1:-1], right=False)  # (N,) bin b holds (edge_b, edge_b+1]
    count = torch.bincount(bins, minlength=n_bins)  # (n_bins,)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64, device=probs.device).index_add_(0, bins, confidence)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64, device=probs.device).index_add_(0, bins, correct)
    denom = count.clamp(min=1).double()  # (n_bins,) empty bins divide 0 by 1
    bin_confidence = conf_sum / denom  # (n_bins,)
    bin_accuracy = acc_sum / denom  # (n_bins,)
    n = probs.shape[0]
    ece = float(((count.double() / n) * (bin_accuracy - bin_confidence).abs()).sum())
    return {
        "ece": ece,
        "accuracy": float(correct.mean()),
        "mean_confidence": float(confidence.mean()),
        "n_bins": n_bins,
        "bin_edges": edges.tolist(),
        "bin_confidence": bin_confidence.tolist(),
        "bin_accuracy": bin_accuracy.tolist(),
        "bin_count": count.tolist(),
    }


def reliability_diagram(data: dict, path: str | Path, title: str = "Reliability diagram") -> Path:
    """Save a reliability diagram (PNG) from :func:`expected_calibration_error`'s output.

    Top panel: accuracy of each non-empty confidence bin (bars) against the diagonal of perfect
    calibration, with the gap to the bin's mean confidence shaded. Bottom panel: samples per bin.
    Uses matplotlib's Agg canvas directly (no pyplot, no display, safe in worker threads);
    matplotlib is needed only here.

    Returns:
        ``path`` as a :class:`~pathlib.Path`; the parent folder is created if needed.
    """
    missing = {"ece", "bin_edges", "bin_confidence", "bin_accuracy", "bin_count"} - set(data)
    if missing:
        raise ValueError(
            f"reliability data lacks {sorted(missing)}; pass the dict returned by expected_calibration_error."
        )
    edges = data["bin_edges"]
    lefts = edges[:-1]
    widths = [hi - lo for lo, hi in zip(edges[:-1], edges[1:])]
    shown = [i for i, c in enumerate(data["bin_count"]) if c > 0]

    fig = agg_figure(figsize=(5.0, 6.0))
    ax, ax_count = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(
        [lefts[i] for i in shown],
        [data["bin_accuracy"][i] for i in shown],
        width=[widths[i] for i in shown],
        align="edge",
        color="tab:blue",
        edgecolor="black",
        label="accuracy",
    )
    gap_low = [min(data["bin_accuracy"][i], data["bin_confidence"][i]) for i in shown]
    gap_height = [abs(data["bin_accuracy"][i] - data["bin_confidence"][i]) for i in shown]
    ax.bar(
        [lefts[i] for i in shown],
        gap_height,
        bottom=gap_low,
        width=[widths[i] for i in shown],
        align="edge",
        color="tab:red",
        alpha=0.3,
        hatch="//",
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nECE = {data['ece']:.4f}", fontsize="medium")
    ax.legend(loc="upper left", fontsize="small")
    ax_count.bar(lefts, data["bin_count"], width=widths, align="edge", color="gray", edgecolor="black")
    ax_count.set_xlabel("confidence")
    ax_count.set_ylabel("samples")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def agg_figure(figsize: tuple[float, float]):
    """A matplotlib Figure on an Agg canvas, without pyplot (no global state, no display).

    matplotlib is imported here, not at module import, so the metrics need only torch.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _validate_probs(probs: torch.Tensor, normalized: bool = True) -> torch.Tensor:
    """Check that ``probs`` is (N, C) of finite rows in [0, 1] summing to 1 (with ``normalized``); return it as
    float64."""
    if not isinstance(probs, torch.Tensor) or probs.ndim != 2 or 0 in probs.shape:
        shape = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise ValueError(f"probs must have shape (N samples, C classes) with N, C >= 1, got {shape}.")
    if not probs.dtype.is_floating_point:
        raise ValueError(f"probs must be a floating-point tensor, got {probs.dtype}.")
    probs = probs.detach().double()
    row_ok = torch.isfinite(probs).all(dim=1) & (probs >= 0).all(dim=1)
    if not normalized:
        row_ok &= (probs <= 1).all(dim=1)
        if not row_ok.all():
            row = int(torch.nonzero(~row_ok)[0])
            raise ValueError(f"probs row {row} has values outside [0, 1] (min {float(probs[row].min()):.4g}, max "
                             f"{float(probs[row].max()):.4g}); pass sigmoid(logits), not raw logits.")
        return probs
    row_ok &= (probs.sum(dim=1) - 1).abs() <= 1e-3
    if not row_ok.all():
        row = int(torch.nonzero(~row_ok)[0])
        raise ValueError(
            f"probs row {row} is not a probability distribution (sum {float(probs[row].sum()):.4g}, "
            f"min {float(probs[row].min()):.4g}); pass softmax(logits), not raw logits."
        )
    return probs
