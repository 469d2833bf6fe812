"""Evaluation: pure functions from embeddings / logits to ``dict[str, float]`` (CLIP_benchmark names)."""

from vlalign.eval.calibration import expected_calibration_error, reliability_diagram
from vlalign.eval.report import clip_benchmark_record, write_benchmark_report
from vlalign.eval.retrieval import (
    RetrievalRanks,
    recall_curve,
    recall_curve_from_ranks,
    recall_from_ranks,
    retrieval_chance,
    retrieval_metrics,
    retrieval_ranks,
)
from vlalign.eval.zero_shot import (
    per_class_accuracy,
    true_class_ranks,
    zero_shot_chance,
    zero_shot_classifier,
    zero_shot_metrics,
)

__all__ = [
    "RetrievalRanks",
    "clip_benchmark_record",
    "expected_calibration_error",
    "per_class_accuracy",
    "recall_curve",
    "recall_curve_from_ranks",
    "recall_from_ranks",
    "reliability_diagram",
    "retrieval_chance",
    "retrieval_metrics",
    "retrieval_ranks",
    "true_class_ranks",
    "write_benchmark_report",
    "zero_shot_chance",
    "zero_shot_classifier",
    "zero_shot_metrics",
]
