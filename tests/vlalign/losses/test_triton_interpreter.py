"""Run the Triton kernel tests on CPU under the Triton interpreter, in a subprocess.

``TRITON_INTERPRET=1`` must be set before triton is imported (and ``@triton.jit`` runs); in this pytest process
torch or another test may already have imported triton, so the kernel tests run in a fresh interpreter.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vlalign.losses.triton import HAS_TRITON

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[2] / "src"


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernels_pass_under_the_interpreter(tmp_path: Path) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(SRC), str(HERE)])}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
         str(HERE / "test_triton_kernels.py")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, check=False,
    )
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    # 15 global-form cases, 9 local-form cases, 6 low-precision cases run under the interpreter.
    assert passed and int(passed.group(1)) >= 30, summary
    assert "failed" not in summary, summary
