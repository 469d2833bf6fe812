"""Step time of the ``portable`` reproducibility mode against ``native`` (issue 16): the cost of pinning ATen, MKL and
oneDNN to their AVX2 / compatible code paths and the thread count.

A process's numeric libraries are pinned once, when they load, so the two modes cannot share one process. This
script is the one driving process: it starts one worker per mode (``--worker portable|native``, each a long-lived
process started in its mode), then asks them in turn, never at once, for ``--steps`` timed training steps of the real
loop step (``vlalign.train.loop.train_step`` + the runtime's optimizer step) on the same preloaded batches: ABBA order
over ``--reps`` repetitions after a warm-up, so load drift on the machine falls on both alike. It reports the medians
and the ratio portable / native (> 1: portable is slower).

    .venv/bin/python benchmarks/bench_reproducibility.py --json benchmarks/results/reproducibility.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from vlalign import reproducibility

HERE = Path(__file__).resolve().parent


def worker(mode: str) -> int:
    """Serve ``run N`` lines on stdin: time N training steps, answer one JSON line; ``quit`` ends."""
    import torch

    sys.path.insert(0, str(HERE))
    from bench_train_step import make_batches  # the same synthetic batches as the train-step benchmark

    from vlalign.distributed.context import DistContext
    from vlalign.models import build_model, get_model_config
    from vlalign.objectives import ObjectiveContext, build_objective
    from vlalign.train.loop import train_step
    from vlalign.train.optim import build_optimizer
    from vlalign.train.runtime import Runtime

    reproducibility.apply_runtime(mode, "cpu")
    cfg = get_model_config(os.environ["BENCH_MODEL"])
    batches = make_batches(cfg, 4, int(os.environ["BENCH_BATCH"]), seq=16)
    torch.manual_seed(0)
    model = build_model(cfg, load_pretrained=False)
    model.train()
    runtime = Runtime.create("cpu", "fp32", DistContext())
    objective = build_objective("clip", {}, ObjectiveContext(dist=DistContext(), model=model, total_steps=10**6,
                                                             steps_per_epoch=10**6))
    optimizer = build_optimizer(model, 1e-5, 0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    print(json.dumps({"ready": True, "numerics": reproducibility.describe()}), flush=True)
    for line in sys.stdin:
        command, _, count = line.strip().partition(" ")
        if command != "run":
            break
        start = time.perf_counter()
        for step in range(int(count)):
            optimizer.zero_grad(set_to_none=True)
            train_step(model, objective, runtime, batches[step % len(batches)], 1)
            runtime.step(optimizer, params, 1.0)
        print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)
    return 0


class Worker:
    """A worker process in one mode, driven line by line."""

    def __init__(self, mode: str, model: str, batch: int) -> None:
        env = reproducibility.child_environment(mode)
        env.update(BENCH_MODEL=model, BENCH_BATCH=str(batch))
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", mode], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.numerics = self._read()["numerics"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker exited ({self.proc.wait()})")
        return json.loads(line)

    def run(self, steps: int) -> float:
        self.proc.stdin.write(f"run {steps}\n")
        self.proc.stdin.flush()
        return self._read()["seconds"]

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=reproducibility.MODES, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="tiny-vit-bert", help="model config (default: %(default)s, the default run's)")
    parser.add_argument("--batch", type=int, default=64, help="batch size (default: %(default)s, the default run's)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repetition (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=6, help="repetitions per mode, ABBA order (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    workers = {mode: Worker(mode, args.model, args.batch) for mode in ("portable", "native")}
    try:
        for w in workers.values():
            w.run(3)  # warm-up: thread pools, allocator, kernel JIT (oneDNN)
        times: dict[str, list[float]] = {mode: [] for mode in workers}
        order = list(workers)
        for rep in range(args.reps):
            for mode in (order if rep % 2 == 0 else order[::-1]):
                times[mode].append(workers[mode].run(args.steps) / args.steps)
    finally:
        for w in workers.values():
            w.close()
    medians = {mode: statistics.median(v) for mode, v in times.items()}
    result = {
        "model": args.model, "batch": args.batch, "steps": args.steps, "reps": args.reps,
        "cpu": reproducibility.describe_host(), "load_average": list(os.getloadavg()),
        "numerics": {mode: w.numerics for mode, w in workers.items()},
        "step_seconds": times, "median_step_seconds": medians,
        "ratio_portable_over_native": medians["portable"] / medians["native"],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "numerics"}, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
