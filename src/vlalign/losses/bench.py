"""``vlalign loss-bench``: time and peak memory of one forward + backward of a contrastive loss at a given size.

Usage::

    python -m vlalign.losses.bench --n 65536 --d 256 --loss clip --impl tiled --device cpu

prints one JSON object (see :func:`loss_bench`), so users can size their batch before training.

How memory is measured:

* **CUDA:** ``torch.cuda.max_memory_allocated()`` after the run minus ``memory_allocated()`` before it (the
  inputs already exist), after one warm-up run at the same size (Triton compiles and autotunes there).
* **CPU:** the run happens in a freshly started Python process. It builds the inputs, warms up on a small
  problem (so thread pools and kernels paged in fall outside the measurement), resets the kernel's peak-RSS
  counter (``echo 5 > /proc/self/clear_refs`` resets VmHWM) and reads VmRSS; afterwards the peak is VmHWM minus
  that VmRSS: the most resident memory the loss added beyond its inputs, gradients included. Where clear_refs is
  not writable it falls back to ``ru_maxrss`` (said in ``peak_method``). ``--mem-limit-mib`` caps the address
  space the run may add (RLIMIT_AS), so a loss that cannot fit fails fast with an ``error`` instead of swapping.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vlalign.errors import ConfigError
from vlalign.losses.select import LOSS_IMPLS, LOSS_KINDS, loss_function, resolve_impl

__all__ = ["DTYPES", "loss_bench", "main", "make_inputs", "run_loss"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
_WARMUP_N = 256  # CPU warm-up batch size


def make_inputs(n: int, d: int, dtype: torch.dtype, device: str | torch.device, seed: int = 0) -> dict:
    """Seeded L2-normalised features (leaves with gradient), logit scale 1/0.07 and SigLIP bias -10."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=gen), dim=-1)  # (N, D)
    text = F.normalize(image + torch.randn(n, d, generator=gen), dim=-1)  # (N, D) correlated with the images
    return {
        "image": image.to(device=device, dtype=dtype).requires_grad_(),
        "text": text.to(device=device, dtype=dtype).requires_grad_(),
        "logit_scale": torch.tensor(1 / 0.07, device=device, requires_grad=True),
        "logit_bias": torch.tensor(-10.0, device=device, requires_grad=True),
    }


def run_loss(kind: str, impl: str, inputs: dict, tile: int) -> torch.Tensor:
    """One forward (single-process global form) of loss ``kind`` with the concrete ``impl``; returns the loss."""
    from vlalign.losses.functional import daa_weights

    fn = loss_function(kind, impl)
    extra = {} if impl == "naive" else {"tile": tile}
    x, y, scale = inputs["image"], inputs["text"], inputs["logit_scale"]
    if kind == "clip":
        return fn(x, y, x, y, scale, **extra)
    if kind == "siglip":
        return fn(x, y, scale, inputs["logit_bias"], **extra)
    return fn(x, y, x, y, scale, daa_weights(x, y), **extra)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status (peak memory on CPU needs Linux).")


def _fwd_bwd(kind: str, impl: str, inputs: dict, tile: int) -> float:
    loss = run_loss(kind, impl, inputs, tile)
    loss.backward()
    return float(loss)


def _measure(cfg: dict) -> dict:
    """Run one fwd+bwd in *this* process as described in the module docstring; return the result dict."""
    n, d, kind, device, tile = cfg["n"], cfg["d"], cfg["loss"], cfg["device"], cfg["tile"]
    dtype = DTYPES[cfg["dtype"]]
    impl = resolve_impl(cfg["impl"], n, device)
    result = {**cfg, "impl_resolved": impl, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)")}
    inputs = make_inputs(n, d, dtype, device, cfg["seed"])
    result["input_bytes"] = 2 * n * d * inputs["image"].element_size()
    cuda = torch.device(device).type == "cuda"
    try:
        if cuda:
            _fwd_bwd(kind, impl, inputs, tile)  # warm-up at full size: Triton compiles and autotunes here
            for t in inputs.values():
                t.grad = None
            torch.cuda.synchronize()
            gc.collect()
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            value = _fwd_bwd(kind, impl, inputs, tile)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() - before
            result.update(peak_method="torch.cuda.max_memory_allocated - allocated before",
                          device_name=torch.cuda.get_device_name())
        else:
            warm = make_inputs(min(n, _WARMUP_N), d, dtype, device, cfg["seed"] + 1)
            _fwd_bwd(kind, impl, warm, min(tile, _WARMUP_N // 2))
            del warm
            gc.collect()
            if cfg.get("mem_limit_mib"):
                limit = _status_kib("VmSize") * 1024 + int(cfg["mem_limit_mib"]) * 2**20
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            try:
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
                peak_method = "VmHWM after clear_refs - VmRSS before (fresh process)"
            except OSError:
                peak_method = "ru_maxrss - VmRSS before (clear_refs not writable; fresh process)"
            rss_before = _status_kib("VmRSS")
            start = time.perf_counter()
            value = _fwd_bwd(kind, impl, inputs, tile)
            seconds = time.perf_counter() - start
            hwm = _status_kib("VmHWM") if peak_method.startswith("VmHWM") else resource.getrusage(
                resource.RUSAGE_SELF).ru_maxrss
            peak = (hwm - rss_before) * 1024
            result.update(peak_method=peak_method, rss_before_mib=rss_before / 1024, cpu=platform.processor())
    except (RuntimeError, MemoryError) as exc:  # out of memory (CUDA OOM is a RuntimeError subclass)
        if not (isinstance(exc, MemoryError) or "memory" in str(exc).lower()):
            raise
        result.update(error=f"out of memory: {str(exc).splitlines()[0][:300]}", seconds=None, peak_bytes=None,
                      peak_mib=None)
        return result
    result.update(seconds=seconds, peak_bytes=int(peak), peak_mib=peak / 2**20, loss_value=value,
                  grad_bytes=2 * n * d * inputs["image"].element_size())
    return result


def _run_fresh(cfg: dict) -> dict:
    """:func:`_measure` in a freshly started interpreter (clean heap), importing this same vlalign."""
    import vlalign

    src = str(Path(vlalign.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    proc = subprocess.run(
        [sys.executable, "-m", "vlalign.losses.bench", "--_worker", json.dumps(cfg)],
        capture_output=True, text=True, env=env, check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        killed = proc.returncode < 0 or proc.returncode == 137
        reason = "killed (out of memory?)" if killed else " | ".join(tail)
        return {**cfg, "error": f"worker exited with {proc.returncode}: {reason}", "seconds": None,
                "peak_bytes": None, "peak_mib": None}
    return json.loads(lines[-1])


def loss_bench(
    n: int,
    d: int,
    loss: str,
    impl: str,
    device: str = "cpu",
    dtype: str = "fp32",
    tile: int = 1024,
    seed: int = 0,
    mem_limit_mib: int | None = None,
) -> dict:
    """One forward + backward of loss ``loss`` at batch ``n`` and dim ``d``; returns a JSON-able dict.

    Keys: ``n, d, loss, impl, impl_resolved, device, dtype, tile, seed, seconds, peak_bytes, peak_mib,
    peak_method, input_bytes, grad_bytes, loss_value, torch, threads`` and ``error`` (only when the run did not
    fit; then ``seconds``/``peak_bytes`` are None). On CPU the run happens in a fresh subprocess.
    """
    if loss not in LOSS_KINDS:
        raise ConfigError(f"--loss: {loss!r} is not one of {', '.join(LOSS_KINDS)}.")
    if impl not in LOSS_IMPLS:
        raise ConfigError(f"--impl: {impl!r} is not one of {', '.join(LOSS_IMPLS)}.")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}.")
    if n < 1 or d < 1 or tile < 1:
        raise ConfigError(f"--n, --d and --tile must be positive, got n={n}, d={d}, tile={tile}.")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here; use --device cpu.")
    resolve_impl(impl, n, dev)  # fail early, in this process, on an impossible impl
    cfg = {"n": n, "d": d, "loss": loss, "impl": impl, "device": device, "dtype": dtype, "tile": tile,
           "seed": seed, "mem_limit_mib": mem_limit_mib}
    if dev.type == "cpu":
        return _run_fresh(cfg)
    return _measure(cfg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlalign loss-bench",
        description="Time and peak memory of one forward+backward of a contrastive loss; prints JSON.",
    )
    parser.add_argument("--n", type=int, default=None, help="global batch size N (required)")
    parser.add_argument("--d", type=int, default=512, help="feature dimension D (default: %(default)s)")
    parser.add_argument("--loss", choices=LOSS_KINDS, default="clip", help="loss kind (default: %(default)s)")
    parser.add_argument("--impl", choices=LOSS_IMPLS, default="auto", help="implementation (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default: %(default)s)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="feature dtype (default: %(default)s)")
    parser.add_argument("--tile", type=int, default=1024, help="tile size of the tiled loss (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="data seed (default: %(default)s)")
    parser.add_argument("--mem-limit-mib", type=int, default=None,
                        help="CPU only: fail instead of allocating more than this many MiB")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``vlalign loss-bench``: prints the JSON of :func:`loss_bench`; exit 1 if it did not fit."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args._worker is not None:
        print(json.dumps(_measure(json.loads(args._worker))), flush=True)
        return 0
    if args.n is None:
        parser.error("the following arguments are required: --n")
    try:
        result = loss_bench(args.n, args.d, args.loss, args.impl, args.device, args.dtype, args.tile, args.seed,
                            args.mem_limit_mib)
    except ConfigError as exc:
        print(f"vlalign loss-bench: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 1 if result.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
