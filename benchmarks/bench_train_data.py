"""Training data at scale (issue 8): memory stays flat as the corpus grows, and the loader is never the bottleneck.

1. ``memory``: peak RSS of a training run (fixed number of steps, streamed shards) on the default dataset with
   2,000 training images and with 40,000 (20x), each in a fresh process (VmHWM after the run). Goal: within +-25%.
   For contrast, the in-RAM cache (``cache_in_memory``) is measured at both sizes too.
2. ``speed``: steps/s of the same stage streaming the real shards (PNG decoding, augmentation, tokenisation on the
   fly) against the same stage fed preloaded tensors, in one process, interleaved repetitions, medians.
   Goal: streamed >= 0.9x preloaded.

    .venv/bin/python benchmarks/bench_train_data.py --work /tmp/bench_data --json benchmarks/results/train_data.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_train_step import Preloaded  # noqa: E402

from vlalign.data.demo import DemoConfig, generate_demo_dataset  # noqa: E402
from vlalign.data.formats import load_corpus  # noqa: E402
from vlalign.data.shards import ShardIndex, write_shards  # noqa: E402
from vlalign.distributed.context import DistContext  # noqa: E402
from vlalign.models import get_model_config  # noqa: E402
from vlalign.train import CheckpointStore, StageConfig, train_stage  # noqa: E402
from vlalign.train.loop import build_train_data  # noqa: E402
from vlalign.train.runtime import Runtime  # noqa: E402


def prepare(work: Path, n_train: int) -> Path:
    """The default dataset with ``n_train`` training images, its training rows as shards; returns the shard folder."""
    shards = work / f"shards_{n_train}"
    if (shards / "shards.json").exists():
        return shards
    root = generate_demo_dataset(work / f"demo_{n_train}", DemoConfig(n_train=n_train, n_val=50, n_test=50,
                                                                    zero_shot_per_class=1))
    images = root / "flickr_demo" / "images"
    manifest = load_corpus([
        {"json": root / "flickr_demo" / "dataset_demo.json", "image_root": images, "lang": "en"},
        {"json": root / "flickr_demo" / "dataset_demo_zh.json", "image_root": images, "lang": "zh"},
    ])
    write_shards(manifest[manifest["split"] == "train"], shards, max_samples=500)
    return shards


def stage(steps: int, **extra) -> StageConfig:
    fields = {"name": "bench", "trainable": ["all"], "max_steps": steps, "batch_size": 64, "lr": 1e-3,
              "warmup_steps": 2, "checkpoint_every": 0, "log_every": 1000, "caption_langs": ["en", "zh"],
              "device": "cpu", "shuffle_buffer": 1000}
    return StageConfig(**{**fields, **extra})


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _memory_run(shards: str, steps: int, cache: bool, queue) -> None:
    torch.set_num_threads(2)
    index = ShardIndex.load(shards)
    with tempfile.TemporaryDirectory() as tmp:
        train_stage(get_model_config("tiny-vit-bert"), stage(steps, cache_in_memory=cache), index, None,
                    CheckpointStore(tmp))
    queue.put({"peak_rss_mib": _vm("VmHWM") / 2**20, "samples": index.n_samples})


def peak_rss(shards: Path, steps: int, cache: bool) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_run, args=(str(shards), steps, cache, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def speed(shards: Path, steps: int, reps: int, num_workers: int) -> dict:
    cfg = get_model_config("tiny-vit-bert")
    index = ShardIndex.load(str(shards))
    streamed_stage = stage(steps, num_workers=num_workers)
    runtime = Runtime.create("cpu", "fp32", DistContext())
    # the very batches the stream yields, decoded once up front: the preloaded reference sees the same data
    source = build_train_data(index, cfg, streamed_stage, DistContext(), runtime)
    batches = [b for _, b in zip(range(steps), source.batches(0, 0))]
    times = {"streamed": [], "preloaded": []}

    def run(data) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            train_stage(cfg, streamed_stage, data, None, CheckpointStore(tmp))
            return time.perf_counter() - start

    run(Preloaded(batches[:3]))  # warm-up
    for _ in range(reps):
        times["streamed"].append(run(index))
        times["preloaded"].append(run(Preloaded(batches)))
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"steps": steps, "reps": reps, "num_workers": num_workers, "seconds": times,
            "steps_per_s": {k: steps / v for k, v in medians.items()},
            "ratio_streamed_over_preloaded": medians["preloaded"] / medians["streamed"], "goal": ">= 0.9"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vlalign_bench_data")
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--large", type=int, default=40000)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--sections", default="memory,speed")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    result: dict = {"threads": torch.get_num_threads(), "load_average": os.getloadavg()}
    if "memory" in args.sections:
        small, large = prepare(args.work, args.small), prepare(args.work, args.large)
        memory = {
            "streamed": {"small": peak_rss(small, args.steps, False), "large": peak_rss(large, args.steps, False)},
            "in_ram_cache": {"small": peak_rss(small, args.steps, True), "large": peak_rss(large, args.steps, True)},
        }
        for kind in memory.values():
            kind["ratio_large_over_small"] = kind["large"]["peak_rss_mib"] / kind["small"]["peak_rss_mib"]
        memory["goal"] = "streamed ratio within 0.75 .. 1.25"
        result["memory"] = memory
    if "speed" in args.sections:
        result["speed"] = speed(prepare(args.work, args.small), args.steps, args.reps, args.num_workers)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
