"""Tiled vs naive contrastive losses on CPU: peak memory at large N, time at N = 4,096, memory-vs-N curve.

Usage:
    .venv/bin/python benchmarks/bench_loss.py                 # full run (15 min on a quiet 2-core VM, more if shared)
    .venv/bin/python benchmarks/bench_loss.py --quick         # smaller sizes (a few minutes)
    .venv/bin/python benchmarks/bench_loss.py --sections time # re-run one section, keep the others in --out
        [--out benchmarks/results/loss_cpu.json] [--plot benchmarks/results/loss_memory_cpu.png] [--reps 5]

Goals (issue 13, CPU):
1. fwd+bwd at N = 65,536, d = 256 in < 256 MiB beyond the inputs, for every loss (the naive loss would need
   N^2 * 4 B = 16 GiB for one logit matrix; it is run under a memory cap and fails cleanly);
2. tiled time <= 1.5x the naive time at N = 4,096, d = 512;
3. a memory-vs-N curve from 1k to 64k for naive and tiled (d = 256), written as a PNG.

Memory: every point runs in a fresh subprocess (``vlalign.losses.bench.loss_bench``): inputs built, warm-up on a
small problem, VmHWM reset through /proc/self/clear_refs, then peak = VmHWM - VmRSS before the run: what the
loss added beyond its inputs, the two (N, D) input gradients included.
Time: one process, naive and tiled interleaved rep by rep after a warm-up, medians (other jobs on the machine
slow both alike).
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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vlalign.losses.bench import loss_bench, make_inputs, run_loss  # noqa: E402

KINDS = ("clip", "siglip", "weighted_clip")


def _mem_available_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 8192


def memory_at_large_n(n: int, d: int, tile: int, cap_mib: int) -> dict:
    """Goal 1: each loss tiled at (n, d); the naive CLIP loss under a memory cap."""
    out = {"n": n, "d": d, "tile": tile, "goal_mib": 256, "tiled": {}, "naive_clip": None}
    for kind in KINDS:
        r = loss_bench(n, d, kind, "tiled", tile=tile)
        out["tiled"][kind] = r
        print(f"  tiled {kind:<14} N={n}: peak {r['peak_mib']:.1f} MiB beyond inputs, {r['seconds']:.1f} s", flush=True)
    r = loss_bench(n, d, "clip", "naive", mem_limit_mib=cap_mib)
    out["naive_clip"] = r
    out["naive_logits_mib"] = n * n * 4 / 2**20
    print(f"  naive clip N={n} (cap {cap_mib} MiB): {r.get('error') or r['peak_mib']}", flush=True)
    out["goal_met"] = all(r["peak_mib"] is not None and r["peak_mib"] < 256 for r in out["tiled"].values())
    return out


def time_ratio(n: int, d: int, tile: int, reps: int, threads: int) -> dict:
    """Goal 2: naive and tiled fwd+bwd interleaved in this process; medians and the tiled/naive ratio per loss."""
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    out = {"n": n, "d": d, "tile": tile, "reps": reps, "threads": threads, "goal_ratio": 1.5}
    for kind in KINDS:
        inputs = make_inputs(n, d, torch.float32, "cpu", seed=0)
        times = {"naive": [], "tiled": []}
        for rep in range(reps + 1):  # rep 0 is the warm-up
            for impl in ("naive", "tiled") if rep % 2 == 0 else ("tiled", "naive"):
                for t in inputs.values():
                    t.grad = None
                gc.collect()
                start = time.perf_counter()
                run_loss(kind, impl, inputs, tile).backward()
                if rep > 0:
                    times[impl].append(time.perf_counter() - start)
        med = {impl: statistics.median(ts) for impl, ts in times.items()}
        out[kind] = {"seconds": times, "median_s": med, "ratio_tiled_over_naive": med["tiled"] / med["naive"]}
        print(f"  {kind:<14} N={n} d={d} threads={threads}: naive {med['naive']:.3f} s, tiled {med['tiled']:.3f} s, "
              f"ratio {med['tiled'] / med['naive']:.2f}", flush=True)
    out["goal_met"] = all(out[k]["ratio_tiled_over_naive"] <= 1.5 for k in KINDS)
    out["load_average_after"] = os.getloadavg()
    out["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "(default)")
    torch.set_num_threads(default_threads)
    return out


def memory_curve(ns: list[int], d: int, tile: int, cap_mib: int, reuse: dict | None) -> dict:
    """Goal 3: peak memory (fresh process per point) of naive and tiled CLIP over N; naive stops at its first OOM."""
    points = {"naive": [], "tiled": []}
    naive_failed = False
    for n in ns:
        if reuse and reuse.get("n") == n and reuse.get("d") == d:
            tiled = reuse["tiled"]["clip"]
        else:
            tiled = loss_bench(n, d, "clip", "tiled", tile=tile)
        points["tiled"].append(tiled)
        if naive_failed:
            naive = {"n": n, "error": "skipped: a smaller N already ran out of memory", "peak_mib": None}
        else:
            naive = loss_bench(n, d, "clip", "naive", mem_limit_mib=cap_mib)
            naive_failed = naive.get("error") is not None
        points["naive"].append(naive)
        naive_text = naive.get("error") or f"{naive['peak_mib']:.1f} MiB ({naive['seconds']:.2f} s)"
        print(f"  N={n:>6}: tiled {tiled['peak_mib']:.1f} MiB ({tiled['seconds']:.2f} s), naive {naive_text}",
              flush=True)
    return {"d": d, "tile": tile, "cap_mib": cap_mib, "points": points}


def plot(curve: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for impl, style in (("naive", "o-"), ("tiled", "s-")):
        pts = [(p["n"], p["peak_mib"]) for p in curve["points"][impl] if p.get("peak_mib") is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=f"{impl} (measured)")
    ns = [p["n"] for p in curve["points"]["tiled"]]
    ax.plot(ns, [n * n * 4 / 2**20 for n in ns], ":", color="grey", label="one N x N fp32 logit matrix")
    ax.axhline(256, color="red", lw=0.8, ls="--", label="goal: 256 MiB")
    failed = [p["n"] for p in curve["points"]["naive"] if p.get("peak_mib") is None]
    if failed:
        ax.axvline(failed[0], color="black", lw=0.6, ls="-.", label=f"naive out of memory (cap {curve['cap_mib']} MiB)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("global batch N")
    ax.set_ylabel("peak memory beyond inputs (MiB)")
    ax.set_title(f"CLIP loss fwd+bwd on CPU, d = {curve['d']}, tile = {curve['tile']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: N=16k memory, N=2k timing, curve to 16k")
    parser.add_argument("--sections", default="large,time,curve",
                        help="comma-separated subset of large,time,curve; the others are kept from an existing --out")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per implementation")
    parser.add_argument("--tile", type=int, default=1024, help="tile of the tiled loss")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/loss_cpu.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "benchmarks/results/loss_memory_cpu.png")
    args = parser.parse_args(argv)
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if not sections <= {"large", "time", "curve"}:
        parser.error(f"--sections: unknown {sorted(sections - {'large', 'time', 'curve'})}; use large,time,curve")

    big_n = 16384 if args.quick else 65536
    ns = [1024 * 2**k for k in range(5 if args.quick else 7)]  # 1k .. 16k or 64k
    cap = max(2048, min(16384, int(_mem_available_mib() * 0.6)))
    summary = json.loads(args.out.read_text()) if args.out.exists() and sections != {"large", "time", "curve"} else {}
    runs = summary.setdefault("runs", [])
    runs.append({"sections": sorted(sections), "quick": args.quick, "tile": args.tile, "reps": args.reps,
                 "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                 "naive_memory_cap_mib": cap, "load_average_at_start": os.getloadavg(),
                 "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    started = time.time()
    if "large" in sections:
        print(f"[large] memory at N={big_n}, d=256", flush=True)
        if "memory_at_large_n" in summary:
            summary.setdefault("memory_at_large_n_history", []).append(summary["memory_at_large_n"])
        summary["memory_at_large_n"] = memory_at_large_n(big_n, 256, args.tile, cap)
    if "time" in sections:
        n_time = 2048 if args.quick else 4096
        print(f"[time] N={n_time}, d=512 (interleaved, medians)", flush=True)
        # At the default thread count and at 1 thread: on a shared 2-core machine the many short parallel ops of
        # the tiled loss suffer from other jobs far more than the few large ones of the naive loss.
        # OMP_WAIT_POLICY=PASSIVE (set before start) makes idle OpenMP threads sleep instead of spinning, which
        # keeps the tiled loss fast on a shared machine; its runs are stored under their own keys.
        policy = os.environ.get("OMP_WAIT_POLICY", "")
        suffix = f"_omp_wait_{policy.lower()}" if policy else ""
        timings = summary.setdefault("time_ratio", {})
        history = summary.setdefault("time_ratio_history", [])  # earlier runs of the same keys, kept
        for t in dict.fromkeys([torch.get_num_threads(), 1]):
            key = f"threads_{t}{suffix}"
            if key in timings:
                history.append({"key": key, **timings[key]})
            timings[key] = time_ratio(n_time, 512, args.tile, args.reps, t)
    if "curve" in sections:
        print(f"[curve] memory vs N ({ns[0]}..{ns[-1]}), d=256", flush=True)
        summary["memory_curve"] = memory_curve(ns, 256, args.tile, cap, summary.get("memory_at_large_n"))
    runs[-1].update(wall_seconds=time.time() - started, load_average_at_end=os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    if "memory_curve" in summary:
        plot(summary["memory_curve"], args.plot)
    large, ratio = summary.get("memory_at_large_n"), summary.get("time_ratio", {})
    goal1 = "not run" if not large else ("met" if large["goal_met"] else "NOT met")
    goal2 = ", ".join(f"{k}: {'met' if v['goal_met'] else 'NOT met'}" for k, v in ratio.items()) or "not run"
    print(f"goal 1 (< 256 MiB at N={big_n}): {goal1}; goal 2 (ratio <= 1.5): {goal2}; wrote {args.out}")
    return summary


if __name__ == "__main__":
    main()
