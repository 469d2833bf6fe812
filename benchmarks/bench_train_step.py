"""vlalign's training step against a plain torch loop, on the same model and the same preloaded batches.

Goal (issue 8): vlalign's step >= 0.97x the steps/s of the plain loop. Both run in this process, interleaved
(plain, vlalign, vlalign, plain, ...: ABBA order) for ``--reps`` repetitions of ``--steps`` steps each, after a warm-up; the
medians are compared. Two figures: the *step* (the steady-state window from step ``log_every`` to the last step,
timed the same way in both loops: the goal) and the whole stage (vlalign's also includes building the model,
hashing the start and final weights, and writing spec.json and final.pt, which the plain loop does not do). The plain loop is what one would write by hand: ``model(batch)``, the CLIP loss,
``zero_grad``, ``backward``, gradient clipping, AdamW, the LR schedule, a loss ``.item()`` every ``log_every`` steps.
vlalign's is the real :func:`vlalign.train.loop.train_stage` (objective registry, runtime, logging, progress bar,
stream position) fed by a :class:`TrainData` that yields the same preloaded tensors.

    .venv/bin/python benchmarks/bench_train_step.py --json benchmarks/results/train_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vlalign.losses.contrastive import clip_loss
from vlalign.models import build_model, get_model_config
from vlalign.train import CheckpointStore, StageConfig, train_stage
from vlalign.train.data import TrainData
from vlalign.train.optim import build_optimizer, build_scheduler, set_trainable


class Preloaded(TrainData):
    """The same tensors every epoch: no decoding, so only the step itself is measured."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self._batches = batches
        self.per_rank_batch = batches[0]["pixels"].shape[0]

    def steps_in_epoch(self, epoch: int) -> int:
        return len(self._batches)

    def batches(self, epoch: int, start: int):
        return iter(self._batches[start:])

    def fingerprint(self) -> str:
        return "preloaded"

    def describe(self) -> dict:
        return {"kind": "preloaded", "batches": len(self._batches)}


def make_batches(cfg, n: int, batch: int, seq: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    size = cfg.image.image_size
    out = []
    for _ in range(n):
        ids = torch.randint(5, 200, (batch, seq), generator=gen)
        ids[:, 0] = 2
        out.append({"pixels": torch.randn(batch, 3, size, size, generator=gen), "input_ids": ids,
                    "attention_mask": torch.ones(batch, seq, dtype=torch.long), "index": torch.arange(batch)})
    return out


class StepClock:
    """Wall time at step ``log_every`` and at the last step (both loops report their logged steps here)."""

    def __init__(self) -> None:
        self.marks: dict[int, float] = {}

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.marks[step] = time.perf_counter()

    def on_checkpoint(self, path, step: int) -> None:
        pass

    def window(self, first: int, last: int) -> float:
        return self.marks[last] - self.marks[first]


def plain_loop(cfg, stage: StageConfig, batches: list[dict[str, torch.Tensor]], clock: StepClock | None = None) -> float:
    """Seconds for len(batches) steps of a hand-written loop."""
    torch.manual_seed(stage.seed)
    model = build_model(cfg, load_pretrained=False)
    set_trainable(model, stage.trainable)
    optimizer = build_optimizer(model, stage.lr, stage.weight_decay)
    scheduler = build_scheduler(optimizer, stage.warmup_steps, len(batches), stage.min_lr_ratio)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    start = time.perf_counter()
    for step, batch in enumerate(batches, start=1):
        out = model(batch)
        loss = clip_loss(out["image_features"], out["text_features"], out["logit_scale"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, stage.grad_clip)
        optimizer.step()
        scheduler.step()
        if step % stage.log_every == 0 or step == len(batches):
            float(loss.detach())
            if clock is not None:
                clock.on_step(step, {})
    return time.perf_counter() - start


def vlalign_loop(cfg, stage: StageConfig, batches: list[dict[str, torch.Tensor]], clock: StepClock | None = None) -> float:
    """Seconds for the same steps through train_stage (a fresh stage folder, final checkpoint included)."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        train_stage(cfg, stage, Preloaded(batches), None, CheckpointStore(tmp), callbacks=[clock] if clock else ())
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-vit-bert", help="model config (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="steps per repetition")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions per method")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.steps <= 10:
        parser.error("--steps must exceed 10 (the step window runs from step 10, the first logged step, to the last)")
    cfg = get_model_config(args.model)
    batches = make_batches(cfg, args.steps, args.batch, seq=16)
    stage = StageConfig(name="bench", trainable=["all"], max_steps=args.steps, batch_size=args.batch, lr=1e-4,
                        warmup_steps=2, checkpoint_every=0, log_every=10, device="cpu")
    plain_loop(cfg, stage, batches[:3])  # warm-up: thread pools, allocator
    vlalign_loop(cfg, stage.__class__(**{**stage.to_dict(), "max_steps": 3}), batches[:3])
    times = {"plain": [], "vlalign": []}
    windows = {"plain": [], "vlalign": []}
    first, last = stage.log_every, args.steps
    loops = [("plain", plain_loop), ("vlalign", vlalign_loop)]
    for rep in range(args.reps):
        for name, loop in (loops if rep % 2 == 0 else loops[::-1]):  # ABBA: neither always runs right after the other
            clock = StepClock()
            times[name].append(loop(cfg, stage, batches, clock))
            windows[name].append(clock.window(first, last))
    medians = {k: statistics.median(v) for k, v in times.items()}
    step_medians = {k: statistics.median(v) for k, v in windows.items()}
    result = {
        "model": args.model, "batch": args.batch, "steps": args.steps, "reps": args.reps,
        "threads": torch.get_num_threads(), "load_average": list(__import__("os").getloadavg()),
        "step_window": [first, last],
        "step_seconds": windows, "median_step_window_seconds": step_medians,
        "steps_per_s": {k: (last - first) / v for k, v in step_medians.items()},
        "ratio_vlalign_over_plain": step_medians["plain"] / step_medians["vlalign"],
        "goal": ">= 0.97 (steady-state steps)",
        "stage_seconds": times, "median_stage_seconds": medians,
        "stage_ratio_vlalign_over_plain": medians["plain"] / medians["vlalign"],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
