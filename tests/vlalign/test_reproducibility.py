"""The portable / native reproducibility modes (vlalign.reproducibility): what each pins, where it is applied, what
is recorded, and that portable training gives the same bits whatever capability the host offers.

Machines whose CPUs differ are simulated with the libraries' own dispatch variables (``ATEN_CPU_CAPABILITY``,
``MKL_ENABLE_INSTRUCTIONS``, ``ONEDNN_MAX_CPU_ISA``) set in the environment of ``vlalign train`` subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from shared import TINY, make_manifest
from vlalign import reproducibility as rp
from vlalign.errors import ConfigError
from vlalign.models import get_model_config
from vlalign.tracking.hashing import weights_sha256


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(base.get(key) or {}, value) if isinstance(value, dict) else value
    return out


# ---------------------------------------------------------------------------------------------------------
# The settings
# ---------------------------------------------------------------------------------------------------------


def test_portable_pins_every_library_and_the_threads() -> None:
    env = rp.environment("portable")
    assert env["ATEN_CPU_CAPABILITY"] == "avx2"
    assert env["MKL_CBWR"].startswith("COMPATIBLE")  # the only MKL branch shared by Intel and non-Intel CPUs
    assert env["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == str(rp.PORTABLE_THREADS)
    assert rp.environment("portable", threads=4)["OMP_NUM_THREADS"] == "4"


def test_native_clears_what_portable_set_but_not_a_users_own_settings() -> None:
    inherited = rp.child_environment("portable", base={"PATH": "/bin"})
    child = rp.child_environment("native", base=inherited)
    assert child[rp.MODE_ENV] == "native"
    assert not set(rp.PINNED) & set(child), "a native child must not inherit the portable pinning"
    own = rp.child_environment("native", base={"ATEN_CPU_CAPABILITY": "default"})
    assert own["ATEN_CPU_CAPABILITY"] == "default"  # set by the user, not by a portable parent: kept


def test_mode_of_a_spec_with_overrides_and_a_bad_mode_named() -> None:
    spec = {"stage": {"name": "s", "reproducibility": "native", "cpu_threads": 3}}
    assert rp.spec_mode(spec) == ("native", 3)
    assert rp.spec_mode(spec, ["reproducibility=portable", "lr=0.1"]) == ("portable", 3)
    assert rp.spec_mode({"stage": {}}) == (rp.DEFAULT_MODE, None)
    with pytest.raises(ConfigError, match="stage reproducibility='fast'"):
        rp.spec_mode({"stage": {"reproducibility": "fast"}})


def test_this_process_is_portable_and_cannot_switch_once_torch_is_loaded() -> None:
    # tests/conftest.py activated portable before torch loaded, as `vlalign` and `kedro run` do
    assert rp.in_force("portable")
    assert torch.backends.cpu.get_cpu_capability() == "AVX2"
    with pytest.raises(rp.ReproducibilityError, match="torch was imported"):
        rp.activate("native")
    assert os.environ[rp.MODE_ENV] == "portable"  # a refused switch changes nothing
    assert rp.in_force("portable", threads=rp.PORTABLE_THREADS + 1)  # threads are set at run time, not at load


def test_described_numerics_say_what_ran() -> None:
    info = rp.describe()
    assert info["mode"] == "portable"
    assert info["aten_cpu_capability"] == "AVX2"
    assert info["threads"] == torch.get_num_threads()
    if torch.backends.mkl.is_available():
        assert info["mkl_cnr"] == "COMPATIBLE,STRICT"  # what MKL itself reports running (its verbose line)
    if torch.backends.mkldnn.is_available():
        assert "AVX2" in info["onednn_isa"] and "512" not in info["onednn_isa"]
    json.dumps(info)  # plain values: stored in checkpoints (weights_only loads) and MLflow params


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
    assert rp.can_reproduce_bits(record(), record(**other_host)) == (True, [])
    native, native_here = record(mode="native"), record(mode="native", **other_host)
    ok, diffs = rp.can_reproduce_bits(native, native_here)
    assert not ok and diffs == ["mkl_host: recorded 'Intel(R) AVX-512', here 'Intel(R) AVX2'",
                                "cpu_flags: recorded ['avx2'], here ['avx2', 'avx512f']"]
    # A portable record audited by a native process (or the reverse) is compared on everything.
    assert [d.split(":")[0] for d in rp.differences(record(), native_here)] == ["mode", "mkl_host", "cpu_flags"]


def test_a_deciding_library_fact_is_a_difference_in_both_modes() -> None:
    for mode in rp.MODES:
        ok, diffs = rp.can_reproduce_bits(record(mode=mode, aten_cpu_capability="AVX512", threads=4), record(mode=mode))
        assert not ok
        assert diffs == ["aten_cpu_capability: recorded 'AVX512', here 'AVX2'", "threads: recorded 4, here 2"]


def test_gpu_recorded_but_absent_or_another_gpu() -> None:
    ok, diffs = rp.can_reproduce_bits(record(gpu=H100), record())
    assert not ok and diffs == ["gpu: recorded 'NVIDIA H100 80GB HBM3' (capability 9.0), here none"]
    # The same GPU model and software reproduce; another driver is another piece of the software stack.
    assert rp.can_reproduce_bits(record(gpu=H100), record(gpu=dict(H100))) == (True, [])
    assert rp.differences(record(gpu=H100), record(gpu={**H100, "driver": "590.2"})) == [
        "gpu.driver: recorded '580.1', here '590.2'"]
    a100 = {**H100, "name": "NVIDIA A100-SXM4-80GB", "capability": "8.0"}
    assert rp.differences(record(gpu=H100), record(gpu=a100)) == [
        "gpu.name: recorded 'NVIDIA H100 80GB HBM3', here 'NVIDIA A100-SXM4-80GB'",
        "gpu.capability: recorded '9.0', here '8.0'"]


def test_nothing_recorded_is_a_difference() -> None:
    for recorded in (None, {}):
        ok, diffs = rp.can_reproduce_bits(recorded, record())
        assert not ok and len(diffs) == 1 and diffs[0].startswith("nothing recorded about the numeric libraries")


def test_this_process_matches_its_own_description() -> None:
    here = rp.describe()
    assert here["mode"] == "portable" and here["aten_cpu_capability"].lower() == "avx2"  # tests/conftest.py pins it
    assert rp.can_reproduce_bits(here, rp.describe()) == (True, [])


# ---------------------------------------------------------------------------------------------------------
# Two short trainings in subprocesses, on simulated hosts
# ---------------------------------------------------------------------------------------------------------

#: The environment of a host with only AVX2 (capped dispatch in every library) and of one with none (scalar ATen).
HOST_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
HOST_OTHER = {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"}


@pytest.fixture(scope="module")
def train_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("repro")
    manifest = root / "manifest.parquet"
    make_manifest(root / "images").to_parquet(manifest)
    model = root / "model.yaml"
    model.write_text(yaml.safe_dump(_merge(get_model_config("tiny-vit-bert").to_dict(), TINY)))
    stage = root / "stage.yaml"
    stage.write_text(yaml.safe_dump({"name": "s", "batch_size": 8, "max_steps": 6, "lr": 0.01, "warmup_steps": 0,
                                     "checkpoint_every": 0, "device": "cpu"}))
    return {"root": root, "manifest": manifest, "model": model, "stage": stage}


def _train(files: dict[str, Path], name: str, mode: str, host: dict[str, str]) -> dict:
    out = files["root"] / name
    env = {k: v for k, v in os.environ.items() if k not in (*rp.PINNED, *rp.THREAD_VARS, rp.MODE_ENV, rp.THREADS_ENV)}
    env.update(host)  # what the simulated host's libraries would dispatch to
    command = [sys.executable, "-m", "vlalign", "train", "--model", str(files["model"]), "--stage", str(files["stage"]),
               "--data", str(files["manifest"]), "--out", str(out), "--set-stage", f"reproducibility={mode}"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out / "final.pt", map_location="cpu", weights_only=True)


def test_portable_training_is_bit_identical_whatever_the_host_offers(train_files: dict[str, Path]) -> None:
    first = _train(train_files, "portable-native-host", "portable", {})
    second = _train(train_files, "portable-other-host", "portable", HOST_OTHER)
    assert first["numerics"]["mode"] == second["numerics"]["mode"] == "portable"
    assert first["numerics"]["aten_cpu_capability"] == second["numerics"]["aten_cpu_capability"] == "AVX2"
    assert weights_sha256(first["model"]) == weights_sha256(second["model"])
    assert rp.can_reproduce_bits(first["numerics"], second["numerics"]) == (True, [])


def test_native_training_records_the_capability_that_decided_its_bits(train_files: dict[str, Path]) -> None:
    avx2 = _train(train_files, "native-avx2", "native", HOST_AVX2)
    scalar = _train(train_files, "native-scalar", "native", HOST_OTHER)
    assert avx2["numerics"]["aten_cpu_capability"] == "AVX2"
    assert scalar["numerics"]["aten_cpu_capability"] == "DEFAULT"
    # the weights may or may not differ (tiny tensors); what the audit must be able to say is why they could
    ok, diffs = rp.can_reproduce_bits(avx2["numerics"], scalar["numerics"])
    assert not ok
    assert any(d.startswith("aten_cpu_capability: recorded 'AVX2', here 'DEFAULT'") for d in diffs), diffs
