"""GPU goals of the tiled contrastive losses (issue 13): Triton vs naive bf16, the largest N, the training step.

Usage (on a CUDA machine; benchmarks/gpu_check.sh runs it once):
    python benchmarks/gpu_loss.py --quick --out benchmarks/results/loss_gpu.json
    python benchmarks/gpu_loss.py --budget-s 170            # autotuned kernels, more repetitions

Sections, in this order, each skipped (and said so in the JSON) when the time budget is spent:
1. ``correctness``: Triton (fp32 features) vs the naive loss in fp64 on the same GPU at N = 2,048, d = 128 for
   CLIP, SigLIP and DAA-weighted CLIP: relative error of the value and of every gradient.
2. ``speed_32k``: one fwd+bwd at N = 32,768, d = 512, bf16 features, naive vs Triton (and the torch tiled loss
   for CLIP), interleaved repetitions after a warm-up (compile + autotune), medians; peak memory of each from
   ``torch.cuda.max_memory_allocated`` beyond the inputs.
3. ``train_step_32k``: a training step at global batch 32,768 on one GPU: two linear projection heads
   (768 -> 512 image, 384 -> 512 text) over fixed random bf16 "backbone features", L2-normalised, the CLIP loss,
   backward, AdamW step, under bf16 autocast; naive vs Triton, interleaved, medians, peak memory. (The towers
   themselves are not run: this isolates what the loss changes in a step.)
4. ``largest_n``: the Triton CLIP loss at d = 512, bf16, N = 65,536 doubling up to 1,048,576; stops at an
   out-of-memory error or when the next size (time ~ N^2) would not fit in the remaining budget. Reports the
   largest N run, its time and peak memory.

Without CUDA it exits with status 2 and a one-line reason (and writes ``{"skipped": reason}`` to ``--out``).
``--cpu-smoke`` runs the same flow at toy sizes on CPU (Triton under TRITON_INTERPRET=1) to check the script.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vlalign.losses.bench import make_inputs, run_loss  # noqa: E402

KINDS = ("clip", "siglip", "weighted_clip")


class Clock:
    """Wall-clock budget shared by the sections."""

    def __init__(self, budget_s: float) -> None:
        self.start, self.budget = time.perf_counter(), budget_s

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> int:
    if not device.startswith("cuda"):
        return 0
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _peak_mib(device: str, before: int) -> float | None:
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _clear_grads(inputs: dict) -> None:
    for t in inputs.values():
        t.grad = None


def correctness(device: str, n: int, d: int) -> dict:
    """Triton (fp32) vs naive fp64 on the same device: max relative error of the value and each gradient."""
    out = {"n": n, "d": d, "dtype": "fp32 vs fp64 reference"}
    for kind in KINDS:
        low = make_inputs(n, d, torch.float32, device, seed=1)
        ref = {k: v.detach().double().requires_grad_() for k, v in low.items()}
        got = run_loss(kind, "triton", low, 1024)
        got.backward()
        want = run_loss(kind, "naive", ref, 1024)
        want.backward()
        errors = {"loss": abs(float(got) - float(want)) / max(1e-12, abs(float(want)))}
        for name in ("image", "text", "logit_scale") + (("logit_bias",) if kind == "siglip" else ()):
            g, w = low[name].grad.double(), ref[name].grad
            errors[name] = float((g - w).abs().max() / w.abs().max().clamp_min(1e-30))
        out[kind] = errors
    out["max_relative_error"] = max(v for k in KINDS for v in out[k].values())
    return out


def _time_interleaved(fns: dict, reps: int, device: str) -> dict:
    """Median seconds of each fn, run interleaved (order alternating each repetition) after one warm-up each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for rep in range(reps):
        order = list(fns) if rep % 2 == 0 else list(reversed(fns))
        for name in order:
            _sync(device)
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(ts), "all_s": ts} for name, ts in times.items()}


def speed(device: str, n: int, d: int, reps: int) -> dict:
    """fwd+bwd at (n, d) bf16: naive vs Triton (and tiled for CLIP), interleaved medians and peak memory."""
    out = {"n": n, "d": d, "dtype": "bf16", "reps": reps}
    for kind in KINDS:
        inputs = make_inputs(n, d, torch.bfloat16, device, seed=2)
        impls = ("naive", "triton", "tiled") if kind == "clip" else ("naive", "triton")
        entry = {}

        def step(impl: str, kind: str = kind, inputs: dict = inputs) -> None:
            _clear_grads(inputs)
            run_loss(kind, impl, inputs, 4096).backward()

        runnable = {}
        for impl in impls:  # peak memory, one isolated run each (also the warm-up: compile and autotune)
            before = _reset_peak(device)
            try:
                step(impl)
                entry[impl] = {"peak_mib": _peak_mib(device, before)}
                runnable[impl] = lambda impl=impl: step(impl)
            except RuntimeError as exc:
                if not _is_oom(exc):
                    raise
                entry[impl] = {"error": "out of memory"}
            _clear_grads(inputs)
        for impl, timing in _time_interleaved(runnable, reps, device).items():
            entry[impl].update(timing)
        if "naive" in runnable and "triton" in runnable:
            entry["speedup_triton_over_naive"] = entry["naive"]["median_s"] / entry["triton"]["median_s"]
        out[kind] = entry
        del inputs
    return out


def train_step(device: str, n: int, reps: int) -> dict:
    """Step time at global batch n: projection heads on fixed random features, CLIP loss, AdamW; naive vs Triton."""
    gen = torch.Generator(device="cpu").manual_seed(3)
    feats_img = torch.randn(n, 768, generator=gen).to(device, torch.bfloat16)  # (N, 768) backbone features
    feats_txt = torch.randn(n, 384, generator=gen).to(device, torch.bfloat16)  # (N, 384)
    out = {"n": n, "heads": "Linear(768->512), Linear(384->512)", "precision": "bf16 autocast", "reps": reps}
    fns, memory = {}, {}
    for impl in ("naive", "triton"):
        torch.manual_seed(0)
        heads = torch.nn.ModuleDict({"image": torch.nn.Linear(768, 512), "text": torch.nn.Linear(384, 512)}).to(device)
        log_scale = torch.nn.Parameter(torch.tensor(2.6592, device=device))  # ln(1/0.07)
        opt = torch.optim.AdamW([*heads.parameters(), log_scale], lr=1e-4)

        def step(impl=impl, heads=heads, log_scale=log_scale, opt=opt) -> float:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
                x = F.normalize(heads["image"](feats_img), dim=-1)  # (N, 512)
                y = F.normalize(heads["text"](feats_txt), dim=-1)  # (N, 512)
                scale = log_scale.exp().clamp(max=100)  # ()
                inputs = {"image": x, "text": y, "logit_scale": scale}
                loss = run_loss("clip", impl, inputs, 4096)
            loss.backward()
            opt.step()
            return float(loss)

        before = _reset_peak(device)
        try:
            step()
            memory[impl] = _peak_mib(device, before)
            fns[impl] = step
        except RuntimeError as exc:
            if not _is_oom(exc):
                raise
            memory[impl] = "out of memory"
    timing = _time_interleaved(fns, reps, device)
    for impl in ("naive", "triton"):
        out[impl] = {"peak_mib_beyond_features": memory[impl], **timing.get(impl, {})}
    if "naive" in timing and "triton" in timing:
        out["step_time_ratio_triton_over_naive"] = timing["triton"]["median_s"] / timing["naive"]["median_s"]
    return out


def largest_n(device: str, d: int, start: int, stop: int, clock: Clock, reserve_s: float) -> dict:
    """Double N from ``start`` to ``stop`` with the Triton CLIP loss (bf16) while it fits in memory and time."""
    runs, reason = [], f"reached N = {stop}"
    n = start
    while n <= stop:
        if runs and runs[-1]["seconds"] * 4.2 > clock.left() - reserve_s:
            reason = f"stopped: N = {n} would take about {runs[-1]['seconds'] * 4:.0f} s, over the time budget"
            break
        try:
            inputs = make_inputs(n, d, torch.bfloat16, device, seed=4)
            before = _reset_peak(device)
            _sync(device)
            t0 = time.perf_counter()
            value = run_loss("clip", "triton", inputs, 4096)
            value.backward()
            _sync(device)
            seconds = time.perf_counter() - t0
            runs.append({"n": n, "seconds": seconds, "peak_mib_beyond_inputs": _peak_mib(device, before),
                         "input_mib": 2 * n * d * 2 / 2**20, "loss": float(value)})
            print(f"  largest_n: N={n} {seconds:.2f} s, peak {runs[-1]['peak_mib_beyond_inputs']} MiB", flush=True)
            del inputs, value
        except RuntimeError as exc:
            if not _is_oom(exc):
                raise
            reason = f"out of memory at N = {n}"
            break
        n *= 2
    return {"d": d, "dtype": "bf16", "loss": "clip", "impl": "triton", "runs": runs,
            "largest_n": runs[-1]["n"] if runs else None, "stop_reason": reason}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, no autotuning (fixed kernel configs)")
    parser.add_argument("--budget-s", type=float, default=170.0, help="wall-clock budget of the whole run")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON results here")
    parser.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        reason = "no CUDA device: gpu_loss.py runs on a GPU machine (benchmarks/gpu_check.sh)"
        print(f"gpu_loss.py: {reason}", file=sys.stderr)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"skipped": reason}, indent=2))
        return 2
    if args.quick:
        os.environ["VLALIGN_TRITON_AUTOTUNE"] = "0"
    device = "cpu" if smoke else "cuda"
    clock = Clock(args.budget_s)
    reps = 3 if args.quick or smoke else 10
    sizes = ({"check": (40, 16), "speed": (64, 32), "step": 64, "largest": (32, 16, 128)} if smoke else
             {"check": (2048, 128), "speed": (32768, 512), "step": 32768, "largest": (65536, 512, 1 << 20)})
    result = {
        "config": {"quick": args.quick, "budget_s": args.budget_s, "smoke": smoke, "torch": torch.__version__,
                   "autotune": os.environ.get("VLALIGN_TRITON_AUTOTUNE", "1") != "0"},
        "device": torch.cuda.get_device_name() if not smoke else "cpu (smoke test)",
    }
    try:
        import triton

        result["config"]["triton"] = triton.__version__
    except ImportError:
        pass

    def section(name: str, min_left: float, fn, *fargs) -> None:
        if clock.left() < min_left:
            result[name] = {"skipped": f"time budget spent ({clock.left():.0f} s left)"}
            return
        t0 = time.perf_counter()
        print(f"[{name}]", flush=True)
        result[name] = fn(*fargs)
        result[name]["section_seconds"] = time.perf_counter() - t0

    section("correctness", 20, correctness, device, *sizes["check"])
    section("speed_32k", 40, speed, device, *sizes["speed"], reps)
    section("train_step_32k", 25, train_step, device, sizes["step"], reps)
    d_big, start, stop = sizes["largest"][1], sizes["largest"][0], sizes["largest"][2]
    section("largest_n", 15, largest_n, device, d_big, start, stop, clock, 5.0)
    result["wall_seconds"] = time.perf_counter() - clock.start
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
