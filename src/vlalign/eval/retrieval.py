"""Image-text retrieval metrics (Flickr30k / COCO multi-caption protocol), computed in chunks.

Metric names follow CLIP_benchmark:

- ``image_retrieval_recall@k`` (text -> image): the fraction of captions whose one correct image
  is among the k best-scoring images.
- ``text_retrieval_recall@k`` (image -> text): the fraction of images with *any* of their captions
  among the k best-scoring captions (the multi-caption protocol of CLIP-like papers; open_clip's
  diagonal-only metric cannot express it).
- ``mean_recall``: the mean of all the recalls above; ``rsum``: their sum x 100, as in the
  retrieval literature (for ks=(1, 5, 10) the maximum is 600).

Values are fractions in [0, 1] (except ``rsum``).

Ties are broken pessimistically. A correct item is within the top k only if fewer than k
*incorrect* candidates score >= it, so a model that scores everything equally gets no credit for
luck in the sort order, and results do not depend on the order of the candidates or on the
sorting algorithm. With no ties this equals the usual definition.

Scores are dot products ``text_emb @ image_emb.T`` (cosine similarity when both are
L2-normalised, which callers are expected to do). Nothing ever holds the full (M, N) score matrix:
queries are processed ``chunk_size`` at a time, so memory is O(chunk_size x max(N, M)) on top of
the embeddings. Each query's scores come from one matrix product, and its correct-item score is
read back from that same product, so exact ties are detected exactly. (Different chunk sizes
may change a score in its last bit, as BLAS picks other kernels; that can only flip near-ties.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import NamedTuple

import torch

#: Ranks are counted as float32 sums of 0/1 values, exact below 2**24 candidates.
_MAX_CANDIDATES = 2**24


class RetrievalRanks(NamedTuple):
    """Pessimistic rank of the correct item for every query (0 = retrieved first).

    The rank is the number of *incorrect* candidates scoring >= the best correct candidate, so a
    query is a hit at k exactly when its rank < k.
    """

    image_retrieval: torch.Tensor  # (M,) long: for each caption, rank of its image among the N images
    text_retrieval: torch.Tensor  # (N,) long: for each image, rank of its best caption among the M captions


def retrieval_ranks(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    chunk_size: int = 1024,
) -> RetrievalRanks:
    """Pessimistic ranks of the correct items in both retrieval directions, in chunks.

    Args:
        image_emb: (N, D) image embeddings, normally L2-normalised.
        text_emb: (M, D) caption embeddings, normally L2-normalised.
        text_to_image: (M,) integer tensor; ``text_to_image[j]`` is the index in ``image_emb`` of
            the image that caption j describes. Every image must have at least one caption.
        chunk_size: number of queries scored at once; peak extra memory is about
            ``4 * chunk_size * max(N, M)`` bytes (one chunk of float32 scores).

    Returns:
        :class:`RetrievalRanks` with the (M,) text->image and (N,) image->text ranks, on the
        embeddings' device (CPU or GPU; both embeddings must be on the same one).

    Raises:
        ValueError: on bad shapes, dtypes or values, non-finite embeddings, an index out of range,
            or an image that no caption points to (it could never be retrieved by image->text, so
            text_retrieval_recall would silently drop; remove such images and re-index
            ``text_to_image``).
    """
    image_emb, text_emb, text_to_image = _validate(image_emb, text_emb, text_to_image, chunk_size)
    return RetrievalRanks(
        image_retrieval=_text_to_image_ranks(image_emb, text_emb, text_to_image, chunk_size),
        text_retrieval=_image_to_text_ranks(image_emb, text_emb, text_to_image, chunk_size),
    )


def recall_from_ranks(ranks: RetrievalRanks, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k in both directions plus ``mean_recall`` and ``rsum`` from precomputed ranks."""
    ks = _validate_ks(ks)
    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = _hit_fraction(ranks.image_retrieval, k)
        metrics[f"text_retrieval_recall@{k}"] = _hit_fraction(ranks.text_retrieval, k)
    return _add_summaries(metrics)


def recall_curve_from_ranks(ranks: RetrievalRanks, max_k: int) -> dict[str, list]:
    """Recall at every K = 1..max_k in both directions from precomputed ranks.

    Returns ``{"k": [1..max_k], "image_retrieval_recall": [...], "text_retrieval_recall": [...]}``
    (lists of Python numbers, ready for JSON and for :func:`vlalign.eval.report.write_benchmark_report`).
    """
    if isinstance(max_k, bool) or not isinstance(max_k, int) or max_k < 1:
        raise ValueError(f"max_k must be a positive int, got {max_k!r}.")
    return {
        "k": list(range(1, max_k + 1)),
        "image_retrieval_recall": _cumulative_hits(ranks.image_retrieval, max_k),
        "text_retrieval_recall": _cumulative_hits(ranks.text_retrieval, max_k),
    }


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@k for text->image and image->text retrieval (CLIP_benchmark names), in chunks.

    Args:
        image_emb: (N, D) image embeddings, normally L2-normalised.
        text_emb: (M, D) caption embeddings, normally L2-normalised.
        text_to_image: (M,) integer tensor mapping each caption to its image's row in ``image_emb``.
            Several captions per image are expected (Flickr30k / COCO: 5). Every image needs >= 1.
        ks: the k values to report, each a positive int (k may exceed the number of candidates;
            the recall is then 1).
        chunk_size: queries scored at once (memory O(chunk_size x max(N, M))).

    Returns:
        ``{"image_retrieval_recall@k": ..., "text_retrieval_recall@k": ..., "mean_recall": ...,
        "rsum": ...}`` with recalls as fractions in [0, 1]; ``mean_recall`` is the mean of all
        2 * len(ks) recalls and ``rsum`` their sum x 100. Ties are broken pessimistically (see
        the module docstring).

    Raises:
        ValueError: see :func:`retrieval_ranks`; also for an empty or non-positive ``ks``.
    """
    ks = _validate_ks(ks)
    return recall_from_ranks(retrieval_ranks(image_emb, text_emb, text_to_image, chunk_size), ks)


def recall_curve(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    max_k: int,
    chunk_size: int = 1024,
) -> dict[str, list]:
    """Recall at every K = 1..max_k in both directions, from one chunked pass over the scores.

    Same arguments and tie rule as :func:`retrieval_metrics`; the value at K equals its
    ``image_retrieval_recall@K`` / ``text_retrieval_recall@K``. Returns
    ``{"k": [...], "image_retrieval_recall": [...], "text_retrieval_recall": [...]}``. To get
    both the metrics and the curve from a single pass, call :func:`retrieval_ranks` once and
    then :func:`recall_from_ranks` and :func:`recall_curve_from_ranks`.
    """
    ranks = retrieval_ranks(image_emb, text_emb, text_to_image, chunk_size)
    return recall_curve_from_ranks(ranks, max_k)


def retrieval_chance(
    text_to_image: torch.Tensor, n_images: int, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Exact expected retrieval metrics under a uniformly random ranking of the candidates.

    - text -> image: the one correct image is at a uniform position among N, so recall@k = min(k, N) / N.
    - image -> text: an image with m of the M captions misses the top k with probability
      C(M - m, k) / C(M, k) (hypergeometric, zero once k > M - m); the recall is the mean over
      images of 1 - that probability. Computed exactly (integer binomials, rational arithmetic)
      and rounded once to float.

    Returns the same keys as :func:`retrieval_metrics` (``mean_recall`` and ``rsum`` included),
    so a report can print the chance level beside each metric.
    """
    ks = _validate_ks(ks)
    text_to_image = _validate_mapping(text_to_image)
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"n_images must be a positive int, got {n_images!r}.")
    counts = _captions_per_image(text_to_image, n_images)  # (N,) captions of each image
    n_captions = int(text_to_image.numel())
    # Images with the same caption count share a miss probability: group them.
    distinct, multiplicity = torch.unique(counts, return_counts=True)
    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = min(k, n_images) / n_images
        shown = min(k, n_captions)  # a top k longer than the caption list shows all of it
        total_comb = math.comb(n_captions, shown)
        expected_hits = sum(
            times * (1 - Fraction(math.comb(n_captions - m, shown), total_comb))
            for m, times in zip(distinct.tolist(), multiplicity.tolist())
        )
        metrics[f"text_retrieval_recall@{k}"] = float(expected_hits / n_images)
    return _add_summaries(metrics)


# ----------------------------------------------------------------------------- internals


def _text_to_image_ranks(
    image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """(M,) number of incorrect images scoring >= the correct one, for every caption."""
    n_captions = text_emb.shape[0]
    ranks = torch.empty(n_captions, dtype=torch.long, device=text_emb.device)
    for start in range(0, n_captions, chunk_size):
        stop = min(start + chunk_size, n_captions)
        scores = text_emb[start:stop] @ image_emb.T  # (B, N)
        correct = scores.gather(1, text_to_image[start:stop, None])  # (B, 1)
        # The correct image always counts itself (finite scores), so subtract 1.
        ranks[start:stop] = _count_ge_(scores, correct) - 1  # (B,)
        del scores  # free this chunk before the next one is allocated
    return ranks


def _image_to_text_ranks(
    image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """(N,) number of incorrect captions scoring >= the image's best correct caption, per image."""
    n_images = image_emb.shape[0]
    # Captions ordered by image, so the captions of images [start, stop) are one slice.
    order = torch.argsort(text_to_image, stable=True)  # (M,)
    offsets = torch.zeros(n_images + 1, dtype=torch.long, device=image_emb.device)  # (N + 1,)
    offsets[1:] = torch.cumsum(torch.bincount(text_to_image, minlength=n_images), dim=0)
    ranks = torch.empty(n_images, dtype=torch.long, device=image_emb.device)
    for start in range(0, n_images, chunk_size):
        stop = min(start + chunk_size, n_images)
        scores = image_emb[start:stop] @ text_emb.T  # (B, M)
        cols = order[offsets[start] : offsets[stop]]  # (P,) correct captions of this chunk
        rows = text_to_image[cols] - start  # (P,) their row in `scores`
        correct = scores[rows, cols]  # (P,) copied out before `scores` is overwritten
        best = torch.full((stop - start,), -math.inf, dtype=scores.dtype, device=scores.device)  # (B,)
        best.scatter_reduce_(0, rows, correct, reduce="amax")
        n_correct_ge = torch.zeros(stop - start, dtype=torch.long, device=scores.device)  # (B,)
        n_correct_ge.scatter_add_(0, rows, (correct >= best[rows]).long())
        ranks[start:stop] = _count_ge_(scores, best[:, None]) - n_correct_ge  # (B,)
        del scores  # free this chunk before the next one is allocated
    return ranks


def _count_ge_(scores: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """(B,) per row, how many of ``scores`` (B, K) are >= ``threshold`` (B, 1); overwrites ``scores``.

    The comparison is written into ``scores`` as 0.0 / 1.0 and summed there: a bool mask would be
    cast to int64 by the reduction, a copy 8x the size of the mask. The float sum of 0/1 values is
    exact since every partial sum is an integer below 2**24 (checked in ``_validate``).
    """
    return scores.ge_(threshold).sum(dim=1).long()


def _hit_fraction(ranks: torch.Tensor, k: int) -> float:
    """Fraction of queries whose pessimistic rank is < k."""
    return int((ranks < k).sum()) / ranks.numel()


def _cumulative_hits(ranks: torch.Tensor, max_k: int) -> list[float]:
    """[fraction of ranks < K for K in 1..max_k] from one histogram of the ranks."""
    hist = torch.bincount(ranks.clamp(max=max_k), minlength=max_k + 1)[:max_k]  # (max_k,)
    hits = torch.cumsum(hist, dim=0).tolist()
    return [h / ranks.numel() for h in hits]


def _add_summaries(metrics: dict[str, float]) -> dict[str, float]:
    """Append ``mean_recall`` (mean of the recalls) and ``rsum`` (their sum x 100)."""
    recalls = list(metrics.values())
    metrics["mean_recall"] = sum(recalls) / len(recalls)
    metrics["rsum"] = 100.0 * sum(recalls)
    return metrics


def _captions_per_image(text_to_image: torch.Tensor, n_images: int) -> torch.Tensor:
    """(N,) number of captions of each image; raises if any image has none or an index is out of range."""
    if text_to_image.numel() and (text_to_image.min() < 0 or text_to_image.max() >= n_images):
        bad = text_to_image[(text_to_image < 0) | (text_to_image >= n_images)]
        raise ValueError(
            f"text_to_image holds image index {int(bad[0])}, outside [0, {n_images}) for "
            f"{n_images} images; it must give each caption's row in image_emb."
        )
    counts = torch.bincount(text_to_image, minlength=n_images)  # (N,)
    empty = torch.nonzero(counts == 0).flatten()
    if empty.numel():
        shown = ", ".join(str(i) for i in empty[:10].tolist())
        raise ValueError(
            f"{empty.numel()} of {n_images} images have no caption in text_to_image (image rows "
            f"{shown}{', ...' if empty.numel() > 10 else ''}). Such an image can never be retrieved "
            "by image->text and would silently lower text_retrieval_recall: drop those rows from "
            "image_emb and re-index text_to_image, or fix the caption-to-image mapping."
        )
    return counts


def _validate_mapping(text_to_image: torch.Tensor) -> torch.Tensor:
    """Check that ``text_to_image`` is a non-empty 1-D integer tensor; return it as long."""
    if not isinstance(text_to_image, torch.Tensor):
        raise ValueError(f"text_to_image must be a torch.Tensor, got {type(text_to_image).__name__}.")
    if text_to_image.ndim != 1 or text_to_image.numel() == 0:
        raise ValueError(f"text_to_image must have shape (M,) with M >= 1, got {tuple(text_to_image.shape)}.")
    if text_to_image.dtype.is_floating_point or text_to_image.dtype.is_complex or text_to_image.dtype == torch.bool:
        raise ValueError(f"text_to_image must be an integer tensor of image indices, got {text_to_image.dtype}.")
    return text_to_image.long()


def _validate_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """Check that ``ks`` is a non-empty sequence of positive ints."""
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}.")
    return ks


def _validate(
    image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check shapes, dtypes and values; return float (>= fp32) CPU embeddings and a long mapping."""
    for name, emb in (("image_emb", image_emb), ("text_emb", text_emb)):
        if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or emb.shape[0] == 0:
            shape = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
            raise ValueError(f"{name} must be a 2-D tensor (rows, D) with at least one row, got {shape}.")
        if not emb.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got {emb.dtype}.")
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            f"image_emb has dimension {image_emb.shape[1]} but text_emb has {text_emb.shape[1]}; "
            "both towers must project to the same embedding size D."
        )
    text_to_image = _validate_mapping(text_to_image)
    if text_to_image.shape[0] != text_emb.shape[0]:
        raise ValueError(
            f"text_to_image has {text_to_image.shape[0]} entries but text_emb has {text_emb.shape[0]} "
            "rows; give one image index per caption."
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
    if image_emb.device != text_emb.device:
        raise ValueError(
            f"image_emb is on {image_emb.device} but text_emb is on {text_emb.device}; move both to one device."
        )
    # Half-precision scores tie far more often than the embeddings warrant: score in >= fp32.
    dtype = torch.promote_types(torch.promote_types(image_emb.dtype, text_emb.dtype), torch.float32)
    image_emb = image_emb.detach().to(dtype=dtype)
    text_emb = text_emb.detach().to(dtype=dtype)
    text_to_image = text_to_image.to(image_emb.device)
    if max(image_emb.shape[0], text_emb.shape[0]) >= _MAX_CANDIDATES:
        raise ValueError(
            f"{image_emb.shape[0]} images x {text_emb.shape[0]} captions: at most {_MAX_CANDIDATES - 1} "
            "candidates per direction are supported (ranks are counted exactly in float32)."
        )
    for name, emb in (("image_emb", image_emb), ("text_emb", text_emb)):
        for start in range(0, emb.shape[0], chunk_size):  # in chunks, to keep memory O(chunk)
            finite = torch.isfinite(emb[start : start + chunk_size]).all(dim=1)  # (B,)
            if not finite.all():
                row = start + int(torch.nonzero(~finite)[0])
                raise ValueError(f"{name} row {row} holds NaN or inf; check the encoder outputs.")
    _captions_per_image(text_to_image, image_emb.shape[0])
    return image_emb, text_emb, text_to_image
