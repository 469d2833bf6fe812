"""Helpers shared by test folders: a tiny model config, a tiny image-caption manifest on disk, a PNG decompression
bomb, the rule for tests that need an external tool (kubectl), and the tolerances for comparing floats that two code
paths (or two CPUs' kernels) compute in a different order."""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

from vlalign.eval.retrieval import RetrievalRanks, recall_from_ranks

#: A tiny tiny-vit-bert: trains in a second on 2 cores.
TINY = {
    "embed_dim": 16,
    "image": {
        "image_size": 32,
        "max_shift": 2,
        "timm_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2},
    },
    "text": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "context_length": 16, "dropout": 0.1},
}
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (35, 75, 225), "yellow": (245, 225, 30)}
SHAPES = ("circle", "square")


def make_manifest(root: Path) -> pd.DataFrame:
    """16 train images (colour x shape x left/right) with 2 English and 1 Chinese caption, plus 2 test rows."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (colour, shape, side) in enumerate((c, s, p) for c in COLOURS for s in SHAPES for p in ("left", "right")):
        image = Image.new("RGB", (32, 32), (118, 118, 118))
        x = 8 if side == "left" else 24
        box = [x - 5, 11, x + 5, 21]
        draw = ImageDraw.Draw(image)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
        path = root / f"{index}.png"
        image.save(path)
        captions = [("en", f"a {colour} {shape} on the {side}"), ("en", f"one {colour} {shape}"), ("zh", "红色圆形")]
        for k, (lang, caption) in enumerate(captions):
            rows.append(
                {"image_id": str(index), "image_path": str(path), "caption": caption, "caption_id": f"{lang}:{index}{k}",
                 "split": "train", "lang": lang, "source": f"test:{index}:{k}", "image_root": str(root.resolve())}
            )
    rows += [
        dict(rows[0], split="test", image_id="t0", caption_id="en:t0"),
        dict(rows[3], split="test", image_id="t1", caption_id="en:t1"),
    ]
    return pd.DataFrame(rows)


def under_ci(env: Mapping[str, str] | None = None) -> bool:
    """Whether the variable ``CI`` is set to something other than empty, "false" or "0" (any case)."""
    value = (os.environ if env is None else env).get("CI", "").strip().lower()
    return value not in ("", "false", "0")


def missing_tool(tool: str, why: str, env: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """None when ``tool`` is on the PATH; else ("fail", message) under CI, ("skip", reason) elsewhere.

    ``why`` says what the tool is for and what still runs without it (the skip reason). ``env`` defaults to
    ``os.environ``; its ``PATH`` is searched.
    """
    env = os.environ if env is None else env
    if shutil.which(tool, path=env.get("PATH", os.defpath)):
        return None
    if under_ci(env):
        return "fail", f"{tool} is required under CI: it is not on the PATH ({why}); install it, or unset CI to skip"
    return "skip", f"{tool} is not on the PATH: {why}"


def require_tool(tool: str, why: str) -> str:
    """The tool's path; otherwise skips the calling test, or fails it under CI (see ``missing_tool``)."""
    missing = missing_tool(tool, why)
    if missing is None:
        return shutil.which(tool)  # type: ignore[return-value]
    action, message = missing
    if action == "fail":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def png_bomb(path: Path, side: int = 60_000) -> Path:
    """A ~14 KB PNG whose header declares ``side`` x ``side`` RGB pixels: the PNG signature, an IHDR with correct CRC,
    one IDAT holding the zlib stream of 14 MB of zero bytes (the first scanlines such a file promises, compressed
    about 1000:1) and IEND. Decoding it would need side * side * 3 bytes (10.8 GB for 60000)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # width, height, 8-bit RGB, deflate, no interlace
    idat = zlib.compress(b"\0" * 14_000_000, 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


#: float32 machine epsilon, 2**-23.
FP32_EPS = torch.finfo(torch.float32).eps


def rounding_tolerance(scale: float, longest_reduction: int, products_in_series: int) -> float:
    """First-order bound on the float32 rounding difference between two evaluations of the same network that sum
    in different orders (other kernels, batch splits or CPUs): a length-n dot product is off by at most n * eps of
    the sum of its absolute terms (Higham's gamma_n), and relative errors add up to first order along a chain of
    products, so a result of magnitude up to ``scale`` is off by at most
    ``products_in_series * longest_reduction * eps * scale``. Observed differences are far smaller (about eps * scale:
    rounding errors mostly cancel), so this bound holds on every kernel with a wide margin."""
    return products_in_series * longest_reduction * FP32_EPS * scale


def recall_bounds(
    text_to_image_scores: torch.Tensor, image_to_text_scores: torch.Tensor, text_to_image: torch.Tensor, margin: float
) -> tuple[dict[str, float], dict[str, float]]:
    """The lowest and the highest retrieval metrics (:func:`vlalign.eval.retrieval.recall_from_ranks`, pessimistic
    ties) that ANY scores within ``margin`` of these, entry by entry, can give: caption->image (M, N) and
    image->text (N, M) scores, ``text_to_image`` (M,). Infinite scores (-inf: a candidate not re-scored) are taken
    to be the same in the scores compared (check that separately).

    A correct item's rank under such scores lies between the number of incorrect candidates scoring more than
    ``correct + 2 * margin`` (both scores may move) and the number scoring at least ``correct - 2 * margin``; exact
    ties stay ties when nothing moves (margin 0, or infinite scores). So two code paths whose scores agree to within
    ``margin`` must report metrics inside these bounds, and with identical scores the bounds are the metrics. This
    is how metrics from two orders of summation are compared: a near-tie that flips in the last bit moves a metric,
    but never outside the bounds."""
    slack = 2.0 * margin

    def rank_range(scores: torch.Tensor, correct: torch.Tensor, incorrect: torch.Tensor):
        """(Q, C) scores, (Q, 1) correct score, (Q, C) incorrect mask -> (lowest, highest) ranks, (Q,) each."""
        tie_holds = (scores == correct) & ((slack == 0) | ~torch.isfinite(scores))  # (Q, C) a tie nothing can split
        lowest = ((scores > correct + slack) | tie_holds) & incorrect
        highest = (scores >= correct - slack) & incorrect
        return lowest.sum(dim=1), highest.sum(dim=1)

    m, n = text_to_image_scores.shape
    is_correct = torch.zeros(m, n, dtype=torch.bool)
    is_correct[torch.arange(m), text_to_image] = True  # (M, N)
    correct = text_to_image_scores.masked_fill(~is_correct, float("-inf")).amax(dim=1, keepdim=True)  # (M, 1)
    image_low, image_high = rank_range(text_to_image_scores, correct, ~is_correct)  # (M,) each
    best = image_to_text_scores.masked_fill(~is_correct.T, float("-inf")).amax(dim=1, keepdim=True)  # (N, 1)
    text_low, text_high = rank_range(image_to_text_scores, best, ~is_correct.T)  # (N,) each
    lowest = recall_from_ranks(RetrievalRanks(image_retrieval=image_high, text_retrieval=text_high))
    highest = recall_from_ranks(RetrievalRanks(image_retrieval=image_low, text_retrieval=text_low))
    return lowest, highest


def assert_within(metrics: dict[str, float], bounds: tuple[dict[str, float], dict[str, float]]) -> None:
    """Every metric of ``metrics`` lies within ``bounds`` (from :func:`recall_bounds`)."""
    lowest, highest = bounds
    assert set(metrics) == set(lowest)
    outside = {k: (lowest[k], v, highest[k]) for k, v in metrics.items() if not lowest[k] <= v <= highest[k]}
    assert not outside, f"metrics outside what scores within the tolerance can give (low, got, high): {outside}"
