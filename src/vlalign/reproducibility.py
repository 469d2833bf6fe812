"""What decides the bits of a result, and the ``portable`` mode that pins it (docs: README "Reproducibility").

Two modes, a field of every stage (``reproducibility``) and of evaluation:

- ``portable``: every numeric library is pinned to one baseline instruction set for the whole process, its
  DataLoader workers and its torchrun ranks: ATen's kernels (``ATEN_CPU_CAPABILITY``), MKL's BLAS (its conditional
  numerical reproducibility, ``MKL_CBWR``, and ``MKL_ENABLE_INSTRUCTIONS``), oneDNN (``ONEDNN_MAX_CPU_ISA``), and a
  fixed number of CPU threads. On CUDA, deterministic algorithms and cuBLAS's fixed workspace.
- ``native``: the libraries pick the fastest kernels of this machine; bits then depend on the CPU (or GPU).

The variables are read when the libraries load, so :func:`activate` must run before ``import torch``; the entry
points (``vlalign``, ``kedro run``, the pod command, torchrun ranks through ``vlalign train``) call it first. This
module imports torch only inside functions.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Mapping

from vlalign.errors import ConfigError, VLAlignError

MODES = ("portable", "native")
#: The mode a stage and evaluation use unless configured (README "Reproducibility" has the measured cost).
DEFAULT_MODE = "portable"
#: CPU threads a portable process computes with, on any machine (reductions split by thread count).
PORTABLE_THREADS = 2
#: The process's mode and thread count, as set by :func:`activate` (inherited by child processes).
MODE_ENV = "VLALIGN_REPRODUCIBILITY"
THREADS_ENV = "VLALIGN_THREADS"
#: The settings portable mode pins: each library's dispatch reads one of these when it loads.
PINNED = {
    "ATEN_CPU_CAPABILITY": "avx2",        # ATen's vectorised kernels (default: the best the CPU has)
    # MKL's conditional numerical reproducibility: branches other than AUTO and COMPATIBLE exist only on Intel CPUs
    # (on others MKL silently falls back to AUTO, the CPU's own dispatch), so the one branch shared by Intel and AMD
    # is COMPATIBLE (SSE2 code); STRICT makes GEMM results independent of memory alignment.
    "MKL_CBWR": "COMPATIBLE,STRICT",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",    # MKL's dispatch cap
    "ONEDNN_MAX_CPU_ISA": "AVX2",         # oneDNN's JIT kernels (convolutions, bf16 matmuls)
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",  # cuBLAS: a fixed workspace, required for deterministic GEMMs
}
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: CPU flags that decide which kernels run (a subset of /proc/cpuinfo's).
FLAGS_THAT_MATTER = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                     "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


class ReproducibilityError(VLAlignError, RuntimeError):
    """The process cannot run in the mode asked for (the libraries already loaded with other settings)."""


def check_mode(mode: Any, where: str = "reproducibility") -> str:
    """``mode`` if it is one of :data:`MODES`, else a ConfigError naming ``where``."""
    if mode not in MODES:
        raise ConfigError(f"{where}={mode!r}: expected one of {list(MODES)}.")
    return str(mode)


def environment(mode: str, threads: int | None = None, base: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """The environment variables of ``mode`` (``None``: remove the variable).

    ``portable`` pins :data:`PINNED` and the thread count (``threads``, default :data:`PORTABLE_THREADS`);
    ``native`` removes what an earlier ``portable`` set in ``base`` (default ``os.environ``) and leaves the rest of
    the environment alone."""
    check_mode(mode)
    if mode == "portable":
        n = str(int(threads or PORTABLE_THREADS))
        return {**PINNED, **dict.fromkeys(THREAD_VARS, n), MODE_ENV: mode, THREADS_ENV: n}
    inherited = (os.environ if base is None else base).get(MODE_ENV) == "portable"
    cleared: dict[str, str | None] = dict.fromkeys([*PINNED, *THREAD_VARS], None) if inherited else {}
    return {**cleared, MODE_ENV: mode, THREADS_ENV: str(int(threads)) if threads else None}


def child_environment(mode: str, threads: int | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A full environment for a child process that runs in ``mode`` (``base`` defaults to ``os.environ``)."""
    env = dict(os.environ if base is None else base)
    for key, value in environment(mode, threads, env).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def current_mode() -> str | None:
    """The mode this process was started in (:data:`MODE_ENV`), None when nothing activated one."""
    return os.environ.get(MODE_ENV)


def in_force(mode: str, threads: int | None = None) -> bool:
    """Whether this process computes in ``mode``: its environment holds the mode's pinned settings (read by the
    libraries when they loaded) and, once torch is loaded, ATen runs the pinned capability. The thread count is not
    part of it: :func:`apply_runtime` sets it when a stage starts (torchrun, for one, starts ranks with 1 thread)."""
    if mode == "native":  # whatever this machine's libraries chose, unless a portable parent pinned them
        return current_mode() != "portable"
    wanted = {k: v for k, v in environment(mode, threads).items() if k in PINNED or k == MODE_ENV}
    # threads are not compared: apply_runtime sets them at run time (torch.set_num_threads sets OpenMP's and MKL's)
    if any(os.environ.get(k) != v for k, v in wanted.items()):
        return False
    if mode == "portable" and "torch" in sys.modules:
        import torch

        return torch.backends.cpu.get_cpu_capability().lower() == PINNED["ATEN_CPU_CAPABILITY"]
    return True


def activate(mode: str, threads: int | None = None) -> None:
    """Put this process (and every process it starts) in ``mode``. Call it before ``import torch``.

    Raises:
        ReproducibilityError: torch is already loaded with other settings; start a new process instead
            (``vlalign train`` / ``kedro run`` do this for you).
    """
    check_mode(mode)
    if in_force(mode, threads):
        if mode == "portable" or threads:  # the thread count is set at run time: record it for child processes
            for key in (*THREAD_VARS, THREADS_ENV):
                os.environ[key] = str(int(threads or PORTABLE_THREADS))
        return
    if "torch" in sys.modules:  # the libraries read their settings when they loaded: too late to change them
        raise ReproducibilityError(
            f"reproducibility={mode} (threads {threads or 'default'}): torch was imported while this process computed "
            f"{current_mode() or 'natively, unpinned'} (ATen runs {_aten_capability()}). Start a new process: "
            f"`vlalign train --spec ...` and `kedro run` apply the mode before importing torch; in a notebook call "
            f"vlalign.reproducibility.activate('{mode}') first.")
    for key, value in environment(mode, threads).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def apply_runtime(mode: str, device_type: str = "cpu", threads: int | None = None) -> None:
    """The settings that can change at run time: the CPU thread count (portable), and on CUDA the deterministic
    algorithms and cuDNN's autotuner (portable; bits then match only on the same GPU model and software)."""
    import torch

    if mode == "portable":
        torch.set_num_threads(int(threads or PORTABLE_THREADS))
    elif threads:
        torch.set_num_threads(int(threads))
    if device_type == "cuda":
        deterministic = mode == "portable"
        torch.use_deterministic_algorithms(deterministic, warn_only=False)
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cudnn.benchmark = not deterministic


def spec_mode(spec: Mapping[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> tuple[str, int | None]:
    """The mode and thread count a train spec's stage asks for, with ``--set-stage`` overrides, read without
    importing torch (what ``vlalign train`` applies before it builds anything)."""
    stage = dict(spec.get("stage") or {})
    for item in overrides:
        key, _, value = item.partition("=")
        if key in ("reproducibility", "cpu_threads"):
            import yaml

            stage[key] = yaml.safe_load(value)
    mode = check_mode(stage.get("reproducibility", DEFAULT_MODE), "stage reproducibility")
    return mode, stage.get("cpu_threads")


# ---------------------------------------------------------------------------------------------------------
# What decides the bits: recorded with every stage run, evaluation and lineage
# ---------------------------------------------------------------------------------------------------------


def _aten_capability() -> str:
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def cpu_flags() -> list[str]:
    """The CPU flags of :data:`FLAGS_THAT_MATTER` this machine has (Linux /proc/cpuinfo; [] elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [flag for flag in FLAGS_THAT_MATTER if flag in have]
    except OSError:
        pass
    return []


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what ``platform`` says."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_host() -> dict[str, Any]:
    """The machine without loading torch: CPU model, the flags that matter, cores."""
    return {"cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "cpu_count": os.cpu_count()}


def _verbose_probe() -> dict[str, str | None]:
    """What MKL and oneDNN say about themselves when they run: MKL's CNR branch and oneDNN's ISA (their verbose
    lines, captured from file descriptor 1 while one small GEMM and one convolution run)."""
    import tempfile

    import torch

    out: dict[str, str | None] = {"mkl_cnr": None, "mkl_host": None, "onednn_isa": None}
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        try:
            with torch.no_grad():
                if torch.backends.mkl.is_available():
                    with torch.backends.mkl.verbose(torch.backends.mkl.VERBOSE_ON):
                        a = torch.ones(16, 16)
                        _ = a @ a
                if torch.backends.mkldnn.is_available():
                    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                        torch.nn.functional.conv2d(torch.ones(1, 3, 32, 32), torch.ones(16, 3, 8, 8), stride=8)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        sink.seek(0)
        text = sink.read().decode("utf-8", errors="replace")
    if m := re.search(r"CNR:(\S+)", text):
        out["mkl_cnr"] = m.group(1)
    if m := re.search(r"MKL_VERBOSE oneMKL[^\n]*? for Intel\(R\) 64 architecture (.*?),? Lnx", text):
        out["mkl_host"] = m.group(1).strip()  # the ISA MKL detected on this CPU (its dispatch without CNR)
    if m := re.search(r"onednn_verbose,(?:v\d+,)?info,cpu,isa:([^\n]+)", text):
        out["onednn_isa"] = m.group(1).strip()
    return out


_PROBE: dict[str, str | None] | None = None


def describe(device: Any = None) -> dict[str, Any]:
    """Everything that decides the bits of this process's results: the mode, ATen's CPU capability, MKL's and
    oneDNN's versions and the branch/ISA they actually run, the CPU flags that matter, the thread counts, the
    pinning variables in force; on CUDA the GPU, its compute capability, driver, CUDA/cuDNN/NCCL and the
    deterministic settings."""
    import torch

    global _PROBE
    if _PROBE is None:
        try:
            _PROBE = _verbose_probe()
        except Exception:  # noqa: BLE001 - no fd 1 to borrow, or a build without verbose modes: record the rest
            _PROBE = {"mkl_cnr": None, "mkl_host": None, "onednn_isa": None}
    info: dict[str, Any] = {
        "mode": current_mode() or "native",
        "torch": str(torch.__version__),  # a plain str: checkpoints load with weights_only=True
        "aten_cpu_capability": _aten_capability(),
        "blas": "mkl" if torch.backends.mkl.is_available() else "other",
        "mkl": _library_version(r"Math Kernel Library Version ([^\n]+?) for"),
        "mkl_host": _PROBE.get("mkl_host"),
        "mkl_cnr": _PROBE.get("mkl_cnr"),
        "onednn": _library_version(r"MKL-DNN v([\d.]+)") if torch.backends.mkldnn.is_available() else None,
        "onednn_isa": _PROBE.get("onednn_isa"),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "env": {k: os.environ.get(k) for k in [*PINNED, *THREAD_VARS]},
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "driver": _cuda_driver(),
            "cuda": str(torch.version.cuda),
            "cudnn": torch.backends.cudnn.version(),
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None,
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        }
    return info


def _library_version(pattern: str) -> str | None:
    """A version string from torch's build configuration (``torch.__config__.show()``)."""
    import torch

    m = re.search(pattern, torch.__config__.show())
    return m.group(1).strip() if m else None


def _cuda_driver() -> str | None:
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10, check=False)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


#: The facts whose difference can change the bits of a result computed on CPU: in every mode, and in native mode
#: also the CPU's own capabilities (which portable mode pins away), and on GPU.
CPU_DECIDING = ("mode", "torch", "aten_cpu_capability", "mkl", "mkl_cnr", "onednn", "onednn_isa", "threads")
NATIVE_DECIDING = ("mkl_host", "cpu_flags")
GPU_DECIDING = ("name", "capability", "driver", "cuda", "cudnn", "nccl", "tf32_matmul", "cudnn_deterministic")


def differences(recorded: Mapping[str, Any] | None, here: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two :func:`describe` records in the facts that decide the bits
    (``["aten_cpu_capability: recorded 'AVX512', here 'AVX2'", ...]``); a GPU recorded but absent here is one.
    A portable record is compared without the host CPU's own capabilities, which portable mode pins away."""
    if not recorded:
        return ["nothing recorded about the numeric libraries (registered before vlalign recorded them)"]
    keys = CPU_DECIDING if recorded.get("mode") == "portable" == here.get("mode") else CPU_DECIDING + NATIVE_DECIDING
    diffs = [f"{key}: recorded {recorded.get(key)!r}, here {here.get(key)!r}"
             for key in keys if recorded.get(key) != here.get(key)]
    rec_gpu, here_gpu = recorded.get("gpu"), here.get("gpu")
    if rec_gpu and not here_gpu:
        diffs.append(f"gpu: recorded {rec_gpu.get('name')!r} (capability {rec_gpu.get('capability')}), here none")
    elif rec_gpu and here_gpu:
        diffs += [f"gpu.{key}: recorded {rec_gpu.get(key)!r}, here {here_gpu.get(key)!r}"
                  for key in GPU_DECIDING if rec_gpu.get(key) != here_gpu.get(key)]
    return diffs


def can_reproduce_bits(recorded: Mapping[str, Any] | None, here: Mapping[str, Any]) -> tuple[bool, list[str]]:
    """Whether this process can promise the recorded bits, and the differences that say why not: every deciding
    fact must be equal (for a portable record the host CPU's own capabilities may differ; for a GPU record the GPU
    model and its software must be the same)."""
    diffs = differences(recorded, here)
    return not diffs, diffs
