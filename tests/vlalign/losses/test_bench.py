"""``vlalign loss-bench`` (``vlalign.losses.bench``): JSON out, honest CPU peak memory, clean failure."""

from __future__ import annotations

import json

import pytest
import torch

from vlalign.errors import ConfigError
from vlalign.losses.bench import loss_bench, main


def test_cli_prints_one_json_measurement(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--n", "512", "--d", "32", "--loss", "siglip", "--impl", "tiled", "--tile", "128"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"n", "d", "loss", "impl", "device", "dtype", "seconds", "peak_bytes", "peak_mib"} <= set(out)
    assert (out["n"], out["d"], out["loss"], out["impl_resolved"]) == (512, 32, "siglip", "tiled")
    assert out["seconds"] > 0 and out["peak_bytes"] >= 0 and "fresh process" in out["peak_method"]
    assert out["loss_value"] > 0


@pytest.mark.slow
def test_naive_peak_is_quadratic_and_a_memory_cap_fails_cleanly() -> None:
    """At N=2048 the naive loss holds at least 4 16 MiB logit matrices at once (exactly 4 with the portable kernels,
    more with some native BLAS workspaces); the tiled one (tile 256) a few 256 KiB tiles."""
    naive = loss_bench(2048, 32, "clip", "naive")
    tiled = loss_bench(2048, 32, "clip", "tiled", tile=256)
    assert naive["peak_bytes"] >= 4 * 2048 * 2048 * 4 > 4 * tiled["peak_bytes"]
    capped = loss_bench(4096, 32, "clip", "naive", mem_limit_mib=32)
    assert capped["peak_bytes"] is None and "out of memory" in capped["error"]


def test_bad_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="--loss"):
        loss_bench(8, 4, "infonce", "naive")
    with pytest.raises(ConfigError, match="--dtype"):
        loss_bench(8, 4, "clip", "naive", dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            loss_bench(8, 4, "clip", "naive", device="cuda")
