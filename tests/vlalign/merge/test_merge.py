"""Weight interpolation and soups: exact identities, averaging, mismatch errors, a merged model that runs."""

from __future__ import annotations

import pytest
import torch

from vlalign.errors import ConfigError, IncompatibleCheckpointsError
from vlalign.merge import interpolate_state_dicts, soup
from vlalign.models import build_model, build_tokenizer_for, get_model_config

TINY = {
    "embed_dim": 16,
    "image": {"image_size": 32, "timm_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}},
    "text": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "context_length": 16},
}


def _state(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(4, 3, generator=generator),
        "b": torch.randn(3, generator=generator, dtype=torch.float64),
        "half": torch.randn(5, generator=generator).half(),
        "position_ids": torch.arange(6),
        "num_batches_tracked": torch.tensor(7),
    }


def test_beta_one_and_zero_reproduce_inputs_bitwise() -> None:
    sd1, sd2 = _state(0), _state(1)
    for beta, expected in ((1.0, sd1), (0.0, sd2), (1, sd1), (0, sd2)):
        merged = interpolate_state_dicts(sd1, sd2, beta)
        assert list(merged) == list(sd1)
        for key in sd1:
            assert torch.equal(merged[key], expected[key]) and merged[key].dtype == expected[key].dtype, key
            assert merged[key].data_ptr() != expected[key].data_ptr()  # copies, not aliases
    mid = interpolate_state_dicts(sd1, sd2, 0.25)
    assert torch.allclose(mid["w"], 0.25 * sd1["w"] + 0.75 * sd2["w"])
    assert torch.allclose(mid["b"], 0.25 * sd1["b"] + 0.75 * sd2["b"])
    assert mid["half"].dtype == torch.float16
    assert torch.equal(mid["position_ids"], sd1["position_ids"])


@pytest.mark.parametrize("beta", [-0.1, 1.5, float("nan")])
def test_beta_outside_unit_interval_is_rejected(beta: float) -> None:
    with pytest.raises(ConfigError, match="must lie in"):
        interpolate_state_dicts(_state(0), _state(1), beta)


def test_mismatches_name_key_shape_and_checkpoints() -> None:
    sd1, sd2 = _state(0), _state(1)
    names = ("stage1/final.pt", "stage2/final.pt")
    missing = {k: v for k, v in sd2.items() if k != "b"}
    with pytest.raises(IncompatibleCheckpointsError, match=r"key 'b' is in stage1/final.pt but not in stage2/final.pt"):
        interpolate_state_dicts(sd1, missing, 0.5, names=names)
    with pytest.raises(IncompatibleCheckpointsError, match=r"key 'extra' is in stage2/final.pt but not in stage1/final.pt"):
        interpolate_state_dicts(sd1, dict(sd2, extra=torch.zeros(1)), 0.5, names=names)
    shape_error = r"key 'w' has shape \(4, 3\) torch.float32 in stage1/final.pt but \(3, 4\)"
    with pytest.raises(IncompatibleCheckpointsError, match=shape_error):
        interpolate_state_dicts(sd1, dict(sd2, w=torch.zeros(3, 4)), 0.5, names=names)
    assert issubclass(IncompatibleCheckpointsError, ValueError)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_non_float_buffers_are_copied_not_refused_or_interpolated(beta: float) -> None:
    """Queue pointers and counters differ between two trained checkpoints: merging copies theta1's."""
    sd1 = dict(_state(0), queue_ptr=torch.tensor([7]), seen=torch.tensor(1234, dtype=torch.int64))
    sd2 = dict(_state(1), queue_ptr=torch.tensor([3]), seen=torch.tensor(99, dtype=torch.int64))
    merged = interpolate_state_dicts(sd1, sd2, beta)
    assert torch.equal(merged["queue_ptr"], sd1["queue_ptr"]) and merged["queue_ptr"].dtype == torch.int64
    assert torch.equal(merged["seen"], sd1["seen"])
    soup_sd = soup([sd1, sd2])
    assert torch.equal(soup_sd["queue_ptr"], sd1["queue_ptr"])


def test_soup_averages() -> None:
    sds = [_state(s) for s in range(3)]
    uniform = soup(sds)
    assert torch.allclose(uniform["w"], (sds[0]["w"] + sds[1]["w"] + sds[2]["w"]) / 3)
    assert torch.equal(uniform["num_batches_tracked"], sds[0]["num_batches_tracked"])
    weighted = soup(sds[:2], weights=[3.0, 1.0])
    assert torch.allclose(weighted["b"], 0.75 * sds[0]["b"] + 0.25 * sds[1]["b"])
    single = soup(sds[:1])
    assert all(torch.equal(single[k], sds[0][k]) for k in sds[0])
    with pytest.raises(ConfigError, match="non-negative"):
        soup(sds, weights=[1.0, -1.0, 1.0])
    with pytest.raises(IncompatibleCheckpointsError, match=r"state_dicts\[1\]"):
        soup([sds[0], {k: v for k, v in sds[1].items() if k != "w"}])


def test_merged_model_runs() -> None:
    cfg = get_model_config("tiny-vit-bert", **TINY)
    torch.manual_seed(0)
    a = build_model(cfg)
    torch.manual_seed(1)
    b = build_model(cfg)
    model = build_model(cfg)
    model.load_state_dict(interpolate_state_dicts(a.state_dict(), b.state_dict(), 0.5), strict=True)
    assert torch.allclose(model.image_proj.weight, (a.image_proj.weight + b.image_proj.weight) / 2)
    tokens = build_tokenizer_for(cfg)(["a red circle", "a blue star"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.eval()({"pixels": torch.randn(2, 3, 32, 32), "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]})
    assert out["image_features"].shape == (2, 16) and torch.isfinite(out["text_features"]).all()
