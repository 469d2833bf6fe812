"""Implementation selection (``loss_impl``) and the ``contrastive_loss`` dispatch."""

from __future__ import annotations

import pytest
import torch
from loss_cases import KINDS, NAIVE, Problem, graph_node_names, max_errors, value_and_grads

from vlalign.errors import ConfigError, LossInputError
from vlalign.losses import LOSS_IMPLS, contrastive_loss, resolve_impl
from vlalign.losses.triton import HAS_TRITON, interpreting


def test_auto_picks_naive_below_and_tiled_above_the_threshold_on_cpu() -> None:
    assert resolve_impl("auto", 8192, torch.device("cpu")) == "naive"
    assert resolve_impl("auto", 8193, "cpu") == "tiled"
    assert resolve_impl("auto", 100, "cpu", tiled_threshold=64) == "tiled"
    assert resolve_impl("naive", 10**6, "cpu") == "naive"
    assert resolve_impl("tiled", 2, "cpu") == "tiled"


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_auto_picks_triton_on_cuda() -> None:
    # resolve_impl only inspects the device type: no GPU is needed to check the rule.
    assert resolve_impl("auto", 16, torch.device("cuda")) == "triton"
    assert resolve_impl("triton", 16, "cuda:0") == "triton"


@pytest.mark.skipif(interpreting(), reason="the interpreter makes triton runnable on CPU")
def test_explicit_triton_on_cpu_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="loss_impl: triton cannot run here.*CUDA.*tiled or auto"):
        resolve_impl("triton", 16, "cpu")


def test_unknown_impl_and_kind_are_clear_errors() -> None:
    assert LOSS_IMPLS == ("auto", "naive", "tiled", "triton")
    with pytest.raises(ConfigError, match="loss_impl: 'fast' is not one of auto, naive, tiled, triton"):
        resolve_impl("fast", 4, "cpu")
    p = Problem.make(3, 4)
    with pytest.raises(ConfigError, match="loss kind: 'infonce'"):
        contrastive_loss("infonce", "naive", image_rows=p.image)
    with pytest.raises(LossInputError, match=r"missing arguments \['logit_bias'\].*unexpected arguments \['text_rows'\]"):
        contrastive_loss("siglip", "naive", image_rows=p.image, text_rows=p.text, text_cols=p.text,
                         logit_scale=p.scale)


def _dispatch(impl: str, tiled_threshold: int = 8192):
    def make(kind):
        def fn(*args, row_offset=0):
            names = {"clip": ("image_rows", "text_rows", "image_cols", "text_cols", "logit_scale"),
                     "siglip": ("image_rows", "text_cols", "logit_scale", "logit_bias"),
                     "weighted_clip": ("image_rows", "text_rows", "image_cols", "text_cols", "logit_scale",
                                       "weights_rows")}[kind]
            return contrastive_loss(kind, impl, tile=4, tiled_threshold=tiled_threshold, row_offset=row_offset,
                                    **dict(zip(names, args)))
        return fn
    return {kind: make(kind) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl,threshold", [("naive", 8192), ("tiled", 8192), ("auto", 8192), ("auto", 4)])
def test_contrastive_loss_dispatches_to_an_equal_loss(kind: str, impl: str, threshold: int) -> None:
    p = Problem.make(10, 5, seed=3, scale=8.0, bias=-2.0)
    got = value_and_grads(kind, _dispatch(impl, threshold), p, rows=slice(5, 10))
    want = value_and_grads(kind, NAIVE, p, rows=slice(5, 10))
    value_err, grad_err = max_errors(got, want)
    assert value_err < 1e-12 and grad_err < 1e-12


def test_auto_really_runs_the_tiled_path_above_the_threshold() -> None:
    p = Problem.make(10, 5, seed=3)
    kwargs = dict(image_rows=p.image, text_rows=p.text, image_cols=p.image, text_cols=p.text, logit_scale=p.scale)
    tiled = contrastive_loss("clip", "auto", tiled_threshold=4, **kwargs)
    naive = contrastive_loss("clip", "auto", tiled_threshold=64, **kwargs)
    assert "_InfoNCEGlobalBackward" in graph_node_names(tiled)
    assert not any("InfoNCE" in name for name in graph_node_names(naive))


def test_import_does_not_need_triton() -> None:
    """``import vlalign.losses`` neither imports triton nor needs it; without it auto falls back to tiled on CUDA."""
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[3] / "src"
    code = (
        "import sys\n"
        "import vlalign.losses\n"
        "assert 'triton' not in sys.modules, 'importing vlalign.losses imported triton'\n"
        "sys.modules['triton'] = None  # now make triton unimportable, as if it were not installed\n"
        "import importlib, vlalign.losses.triton as T\n"
        "importlib.reload(T)\n"
        "from vlalign.losses.triton import ops\n"
        "assert not T.HAS_TRITON\n"
        "from vlalign.losses.select import resolve_impl\n"
        "print(resolve_impl('auto', 10, 'cuda'), ops.triton_unavailable_reason(__import__('torch').device('cuda')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[0] == "tiled" and "triton is not installed" in proc.stdout
