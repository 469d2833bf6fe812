"""Chunked retrieval metrics vs a full-matrix, full-sort reference at COCO-5k scale.

Usage:
    .venv/bin/python benchmarks/bench_retrieval.py [--images 5000] [--captions-per-image 5]
        [--dim 512] [--chunk-size 1024] [--noise 7.0] [--seed 0] [--json OUT]

Data: N random unit image embeddings; each of the N x captions-per-image captions is its image's
embedding plus Gaussian noise (norm about ``--noise``), re-normalised, so recall is far above
chance but below 1. Captions are shuffled, so an image's captions are not contiguous.

Each method runs in its own freshly spawned Python process, which loads the embeddings from a
file, warms up by running the same method on a 64-image problem, then resets the kernel's peak-RSS counter
(``echo 5 > /proc/self/clear_refs`` resets VmHWM) and reads VmRSS. After the method, the peak
memory is ``VmHWM - VmRSS_before``: the largest resident memory the method itself added, torch
tensors included (tracemalloc sees only Python allocations). Where clear_refs is not writable the
script falls back to ``ru_maxrss - VmRSS_before`` and says so; that can only under-report if the
process was larger before the method than during it, which loading and warm-up keep small.

The reference builds the full (M, N) score matrix and fully sorts every row, per direction, with
pessimistic tie-breaking built into the sort key: correct candidates get the next float64 below
their float32 score (``nextafter``), which sorts them after every tied incorrect candidate but
before every strictly lower one. The rank is then the position of the first correct candidate.
The script asserts both methods return identical metrics.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F

KS = (1, 5, 10)


def make_data(n_images: int, captions_per_image: int, dim: int, noise: float, seed: int) -> dict:
    """Seeded unit embeddings with a planted image-caption signal; captions in shuffled order."""
    gen = torch.Generator().manual_seed(seed)
    image_emb = F.normalize(torch.randn(n_images, dim, generator=gen), dim=-1)  # (N, D)
    n_captions = n_images * captions_per_image
    text_to_image = torch.arange(n_images).repeat_interleave(captions_per_image)  # (M,)
    text_to_image = text_to_image[torch.randperm(n_captions, generator=gen)]
    noise_vec = torch.randn(n_captions, dim, generator=gen) * (noise / dim**0.5)  # (M, D)
    text_emb = F.normalize(image_emb[text_to_image] + noise_vec, dim=-1)  # (M, D)
    return {"image_emb": image_emb, "text_emb": text_emb, "text_to_image": text_to_image}


def first_correct_position(scores: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """(Q,) position of the first correct candidate after a full descending sort of every row.

    ``scores`` (Q, K) float32, ``correct`` (Q, K) bool. Correct entries are nudged to the next
    float64 below their score so that they sort after tied incorrect entries (pessimistic ties).
    """
    key = scores.double()  # (Q, K) exact copy of the float32 scores
    key = torch.where(correct, torch.nextafter(key, torch.tensor(-torch.inf, dtype=key.dtype)), key)
    order = torch.argsort(key, dim=1, descending=True)  # (Q, K) full sort of every row
    del key
    return correct.gather(1, order).int().argmax(dim=1)  # (Q,) first True


def full_sort_reference(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor) -> dict:
    """Recall@k from the full score matrix and a full argsort per direction."""
    n_images = image_emb.shape[0]
    scores = text_emb @ image_emb.T  # (M, N) full text -> image score matrix
    correct = torch.zeros_like(scores, dtype=torch.bool)  # (M, N)
    correct[torch.arange(scores.shape[0]), text_to_image] = True
    t2i_rank = first_correct_position(scores, correct)  # (M,)
    del scores, correct
    scores = image_emb @ text_emb.T  # (N, M) full image -> text score matrix
    correct = text_to_image[None, :] == torch.arange(n_images)[:, None]  # (N, M)
    i2t_rank = first_correct_position(scores, correct)  # (N,)
    del scores, correct
    metrics = {}
    for k in KS:
        metrics[f"image_retrieval_recall@{k}"] = int((t2i_rank < k).sum()) / t2i_rank.numel()
        metrics[f"text_retrieval_recall@{k}"] = int((i2t_rank < k).sum()) / i2t_rank.numel()
    recalls = list(metrics.values())
    metrics["mean_recall"] = sum(recalls) / len(recalls)
    metrics["rsum"] = 100.0 * sum(recalls)
    return metrics


def _status_kib(field: str) -> int:
    """A ``VmRSS`` / ``VmHWM`` value from /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status (Linux only).")


def _measure(method: str, data_path: str, chunk_size: int) -> dict:
    """Run one method in this (fresh) process; return its metrics, wall time and peak RSS delta."""
    from vlalign.eval.retrieval import retrieval_metrics

    def run(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor) -> dict:
        if method == "chunked":
            return retrieval_metrics(image_emb, text_emb, text_to_image, KS, chunk_size)
        return full_sort_reference(image_emb, text_emb, text_to_image)

    data = torch.load(data_path, weights_only=True)
    # Warm up on a small problem, so one-time costs (thread pools, loading BLAS / sort kernels
    # into memory) fall outside the measurement for both methods alike.
    small = F.normalize(torch.randn(64, data["image_emb"].shape[1]), dim=-1)  # (64, D)
    run(small, small.repeat(2, 1), torch.arange(64).repeat(2))
    del small
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        peak_method = "VmHWM after clear_refs"
    except OSError:
        peak_method = "ru_maxrss (clear_refs not writable)"
    rss_before = _status_kib("VmRSS")
    start = time.perf_counter()
    metrics = run(data["image_emb"], data["text_emb"], data["text_to_image"])
    seconds = time.perf_counter() - start
    if peak_method.startswith("VmHWM"):
        peak = _status_kib("VmHWM")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "metrics": metrics,
        "seconds": seconds,
        "peak_rss_delta_mib": (peak - rss_before) / 1024,
        "rss_before_mib": rss_before / 1024,
        "peak_method": peak_method,
    }


def run_isolated(method: str, data_path: str, chunk_size: int) -> dict:
    """Run :func:`_measure` in a freshly spawned process, so each method starts from a clean heap."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_measure, method, data_path, chunk_size).result()


def main(argv: list[str] | None = None) -> dict:
    """Parse the flags, run both methods, print a table, check equality, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000, help="number of images N")
    parser.add_argument("--captions-per-image", type=int, default=5, help="captions per image (M = N x this)")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension D")
    parser.add_argument("--chunk-size", type=int, default=1024, help="queries per chunk for the chunked method")
    parser.add_argument("--noise", type=float, default=7.0, help="caption noise norm (higher = lower recall)")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    parser.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)

    data = make_data(args.images, args.captions_per_image, args.dim, args.noise, args.seed)
    n_captions = data["text_to_image"].numel()
    with tempfile.TemporaryDirectory() as tmp:
        data_path = str(Path(tmp) / "embeddings.pt")
        torch.save(data, data_path)
        del data
        results = {name: run_isolated(name, data_path, args.chunk_size) for name in ("chunked", "full_sort")}

    chunked, full = results["chunked"], results["full_sort"]
    identical = chunked["metrics"] == full["metrics"]
    summary = {
        "config": {**{k: v for k, v in vars(args).items() if k != "json"}, "captions": n_captions,
                   "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "chunked": chunked,
        "full_sort": full,
        "time_ratio_full_over_chunked": full["seconds"] / chunked["seconds"],
        "memory_ratio_full_over_chunked": full["peak_rss_delta_mib"] / chunked["peak_rss_delta_mib"],
        "metrics_identical": identical,
    }

    print(f"{args.images} images x {n_captions} captions, D={args.dim}, chunk={args.chunk_size}, "
          f"{torch.get_num_threads()} torch threads; peak memory by {chunked['peak_method']}")
    print(f"{'method':<12}{'wall s':>10}{'peak RSS delta MiB':>22}")
    for name in ("chunked", "full_sort"):
        print(f"{name:<12}{results[name]['seconds']:>10.2f}{results[name]['peak_rss_delta_mib']:>22.1f}")
    print(f"{'full/chunked':<12}{summary['time_ratio_full_over_chunked']:>9.2f}x"
          f"{summary['memory_ratio_full_over_chunked']:>21.1f}x")
    print(f"\n{'metric':<30}{'chunked':>12}{'full_sort':>12}")
    for key, value in chunked["metrics"].items():
        print(f"{key:<30}{value:>12.4f}{full['metrics'][key]:>12.4f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
    if not identical:
        sys.exit("FAIL: the chunked metrics differ from the full-sort reference.")
    print("\nOK: metrics identical.")
    return summary


if __name__ == "__main__":
    main()
