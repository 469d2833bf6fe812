"""GPU training checks (issue 8): fp32 vs bf16 loss agreement, and steps/s, peak memory and MFU of a ViT-B/16 +
BERT-base-sized dual encoder at batch 256 in bf16, with and without torch.compile, through the real
:func:`vlalign.train.loop.train_stage` (synthetic batches preloaded on the GPU, so the model step is measured).

    python benchmarks/gpu_train.py --out results.json            # on a GPU (benchmarks/gpu_check.sh runs it)
    python benchmarks/gpu_train.py --tiny --device cpu --steps 2   # a smoke run anywhere (the test suite does this)

MFU = model FLOPs per step (counted by torch.utils.flop_counter on one forward+backward) x steps/s / the GPU's
peak dense bf16 FLOP/s (``--peak-tflops``; 989 for an H100/H200 SXM).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from bench_train_step import Preloaded, make_batches  # noqa: E402

from vlalign.distributed.context import DistContext  # noqa: E402
from vlalign.models import build_model, get_model_config  # noqa: E402
from vlalign.objectives import ObjectiveContext, build_objective  # noqa: E402
from vlalign.train import CheckpointStore, StageConfig, train_stage  # noqa: E402
from vlalign.train.runtime import Runtime  # noqa: E402

TINY = {"embed_dim": 16, "image": {"image_size": 32, "timm_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32,
        "depth": 1, "num_heads": 2}}, "text": {"hidden_size": 32, "num_layers": 1, "num_heads": 2,
        "intermediate_size": 64, "context_length": 16}}


def to_device(batches, device):
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def precision_agreement(cfg, batch, device) -> dict:
    """The same fixed batch's CLIP loss in fp32 and under bf16 autocast (same weights)."""
    torch.manual_seed(0)
    model = build_model(cfg, load_pretrained=False).to(device).eval()
    objective = build_objective("clip", {}, ObjectiveContext(model=model))
    losses = {}
    for precision in ("fp32", "bf16"):
        runtime = Runtime.create(device.type, precision, DistContext())
        with torch.no_grad(), runtime.autocast():
            losses[precision] = float(objective(model(batch), batch)["loss"])
    return {**losses, "abs_diff": abs(losses["fp32"] - losses["bf16"]),
            "rel_diff": abs(losses["fp32"] - losses["bf16"]) / abs(losses["fp32"])}


def step_flops(cfg, batch, device) -> int:
    """FLOPs of one forward + backward of the model and the CLIP loss."""
    model = build_model(cfg, load_pretrained=False).to(device).train()
    objective = build_objective("clip", {}, ObjectiveContext(model=model))
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = objective(model(batch), batch)["loss"]
        loss.backward()
    return int(counter.get_total_flops())


def throughput(cfg, batches, device, precision: str, compile_model: bool, steps: int) -> dict:
    """Steps/s over ``steps`` timed steps after a warm-up run (which also compiles), and peak memory."""
    stage = StageConfig(name="gpu", trainable=["all"], max_steps=len(batches), batch_size=batches[0]["pixels"].shape[0],
                        lr=1e-4, warmup_steps=1, checkpoint_every=0, log_every=10_000, device=device.type,
                        precision=precision, compile=compile_model)
    data = Preloaded(batches)
    with tempfile.TemporaryDirectory() as tmp:
        train_stage(cfg, stage, data, None, CheckpointStore(Path(tmp) / "warm"))  # warm-up / compilation
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        timed = StageConfig(**{**stage.to_dict(), "max_steps": steps})
        start = time.perf_counter()
        train_stage(cfg, timed, data, None, CheckpointStore(Path(tmp) / "timed"))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"precision": precision, "compile": compile_model, "steps": steps, "seconds": seconds,
            "steps_per_s": steps / seconds, "peak_memory_gib": peak / 2**30 if peak is not None else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit-b16-bert-base")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s of the GPU")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and batch (smoke test on any device)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurement")
    parser.add_argument("--vocab", default=None, help="override the text vocab (e.g. pkg:vlalign/assets/demo_vocab.txt "
                        "where cn-clip, which ships the default vocab, is not installed)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU visible to torch; run with --device cpu --tiny for a smoke test", file=sys.stderr)
        return 2
    overrides = {"text.vocab": args.vocab} if args.vocab else {}
    cfg = get_model_config("tiny-vit-bert", **TINY) if args.tiny else get_model_config(args.model, **overrides)
    batch_size = 8 if args.tiny else args.batch
    seq = 16 if args.tiny else 32
    batches = to_device(make_batches(cfg, max(args.steps, 2), batch_size, seq), device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "model": cfg.name, "batch": batch_size, "seq_len": seq,
        "parameters_millions": sum(p.numel() for p in build_model(cfg, load_pretrained=False).parameters()) / 1e6,
        "precision_agreement": precision_agreement(cfg, batches[0], device),
    }
    flops = step_flops(cfg, batches[0], device)
    result["flops_per_step"] = flops
    runs = [throughput(cfg, batches, device, "bf16", False, args.steps)]
    if not args.no_compile:
        runs.append(throughput(cfg, batches, device, "bf16", True, args.steps))
    for run in runs:
        run["achieved_tflops"] = flops * run["steps_per_s"] / 1e12
        run["mfu"] = run["achieved_tflops"] / args.peak_tflops if device.type == "cuda" else None
    result["throughput"] = runs
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
