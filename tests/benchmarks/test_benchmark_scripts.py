"""The benchmark scripts run (tiny sizes, CPU), so they do not rot between the runs that produce the README's
figures; the GPU check's Python part runs in its CPU smoke mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _run(*args: str, tmp_path: Path) -> dict:
    out = tmp_path / "out.json"
    done = subprocess.run([sys.executable, *args, str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(out.read_text())


def test_gpu_train_smoke_on_cpu(tmp_path: Path) -> None:
    result = _run(str(BENCH / "gpu_train.py"), "--tiny", "--device", "cpu", "--steps", "2", "--no-compile", "--out",
                  tmp_path=tmp_path)
    assert result["device"] == "cpu" and result["flops_per_step"] > 0
    agreement = result["precision_agreement"]
    assert agreement["rel_diff"] < 0.05  # bf16 autocast stays close to fp32 on a fixed batch
    (run,) = result["throughput"]
    assert run["precision"] == "bf16" and run["steps_per_s"] > 0


def test_train_step_benchmark_smoke(tmp_path: Path) -> None:
    result = _run(str(BENCH / "bench_train_step.py"), "--batch", "8", "--steps", "12", "--reps", "1", "--json",
                  tmp_path=tmp_path)
    assert set(result["median_stage_seconds"]) == {"plain", "vlalign"} and result["ratio_vlalign_over_plain"] > 0
    assert all(0 < w < s for w, s in zip(result["step_seconds"]["vlalign"], result["stage_seconds"]["vlalign"]))


def test_reproducibility_benchmark_smoke(tmp_path: Path) -> None:
    result = _run(str(BENCH / "bench_reproducibility.py"), "--batch", "8", "--steps", "1", "--reps", "2", "--json",
                  tmp_path=tmp_path)
    assert result["numerics"]["portable"]["aten_cpu_capability"] == "AVX2"
    assert result["numerics"]["native"]["mode"] == "native" and result["numerics"]["portable"]["mode"] == "portable"
    assert len(result["step_seconds"]["portable"]) == len(result["step_seconds"]["native"]) == 2
    assert result["ratio_portable_over_native"] > 0
