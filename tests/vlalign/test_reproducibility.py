"""vlalign.reproducibility: which differences between two numerics records decide the bits (what the audit uses to
say FAIL or fall back to a tolerance)."""

from __future__ import annotations

from vlalign import reproducibility
from vlalign.reproducibility import can_reproduce_bits, differences

#: A CPU record as describe() writes it (the fields the comparison reads, plus some it must ignore).
BASE = {"mode": "portable", "torch": "2.14.1", "aten_cpu_capability": "AVX2", "mkl": "2025.2", "mkl_cnr": "COMPATIBLE",
        "onednn": "3.9.1", "onednn_isa": "AVX2", "threads": 2, "mkl_host": "Intel(R) AVX-512", "cpu_flags": ["avx2"],
        "interop_threads": 2, "blas": "mkl"}
H100 = {"name": "NVIDIA H100 80GB HBM3", "capability": "9.0", "cuda": "13.0", "cudnn": 91400, "tf32_matmul": False,
        "cudnn_deterministic": True, "driver": "580.1"}


def record(**changes) -> dict:
    return {**BASE, **changes}


def test_portable_ignores_the_host_cpu_but_native_does_not() -> None:
    other_host = {"mkl_host": "Intel(R) AVX2", "cpu_flags": ["avx2", "avx512f"], "interop_threads": 16}
    assert can_reproduce_bits(record(), record(**other_host)) == (True, [])
    native, native_here = record(mode="native"), record(mode="native", **other_host)
    ok, diffs = can_reproduce_bits(native, native_here)
    assert not ok and diffs == ["mkl_host: recorded 'Intel(R) AVX-512', here 'Intel(R) AVX2'",
                                "cpu_flags: recorded ['avx2'], here ['avx2', 'avx512f']"]
    # A portable record audited by a native process (or the reverse) is compared on everything.
    assert [d.split(":")[0] for d in differences(record(), native_here)] == ["mode", "mkl_host", "cpu_flags"]


def test_a_deciding_library_fact_is_a_difference_in_both_modes() -> None:
    for mode in reproducibility.MODES:
        ok, diffs = can_reproduce_bits(record(mode=mode, aten_cpu_capability="AVX512", threads=4), record(mode=mode))
        assert not ok
        assert diffs == ["aten_cpu_capability: recorded 'AVX512', here 'AVX2'", "threads: recorded 4, here 2"]


def test_gpu_recorded_but_absent_or_another_gpu() -> None:
    ok, diffs = can_reproduce_bits(record(gpu=H100), record())
    assert not ok and diffs == ["gpu: recorded 'NVIDIA H100 80GB HBM3' (capability 9.0), here none"]
    # The same GPU model and software: only facts that do not decide the bits (the driver) differ.
    assert can_reproduce_bits(record(gpu=H100), record(gpu={**H100, "driver": "590.2"})) == (True, [])
    a100 = {**H100, "name": "NVIDIA A100-SXM4-80GB", "capability": "8.0"}
    assert differences(record(gpu=H100), record(gpu=a100)) == [
        "gpu.name: recorded 'NVIDIA H100 80GB HBM3', here 'NVIDIA A100-SXM4-80GB'",
        "gpu.capability: recorded '9.0', here '8.0'"]


def test_nothing_recorded_is_a_difference() -> None:
    for recorded in (None, {}):
        ok, diffs = can_reproduce_bits(recorded, record())
        assert not ok and len(diffs) == 1 and diffs[0].startswith("nothing recorded about the numeric libraries")


def test_this_process_matches_its_own_description() -> None:
    here = reproducibility.describe()
    assert here["mode"] == "portable" and here["aten_cpu_capability"].lower() == "avx2"  # tests/conftest.py pins it
    assert can_reproduce_bits(here, reproducibility.describe()) == (True, [])
