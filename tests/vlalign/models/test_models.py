"""Model configs, towers (scratch and local pretrained), the CLIP model, transforms and inference helpers."""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vlalign.errors import CheckpointError, ConfigError
from vlalign.models import (
    CLIPModel,
    ModelConfig,
    build_model,
    build_tokenizer_for,
    build_transform,
    get_model_config,
    list_models,
)
from vlalign.models.inference import embed_images, embed_texts
from vlalign.models.towers import build_image_tower, load_image_weights
from vlalign.paths import resolve_path

#: A model small enough to build and run in well under a second.
TINY = {
    "embed_dim": 16,
    "image": {"image_size": 32, "timm_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}},
    "text": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "context_length": 16},
}


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to open a network connection fail the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _tokens(cfg: ModelConfig, texts: list[str]) -> dict[str, torch.Tensor]:
    tokenizer = build_tokenizer_for(cfg)
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=cfg.text.context_length, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def test_registry_overrides_and_round_trip() -> None:
    assert {"tiny-vit-bert", "efficientnet-lite0-minilm"} <= set(list_models())
    cfg = get_model_config("tiny-vit-bert", embed_dim=64, image={"timm_kwargs": {"depth": 2}}, **{"text.num_layers": 3})
    assert (cfg.embed_dim, cfg.image.timm_kwargs["depth"], cfg.text.num_layers) == (64, 2, 3)
    assert cfg.image.timm_kwargs["img_size"] == 64  # nested dicts merge key by key
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert math.isclose(cfg.init_logit_scale, math.log(1 / 0.07))


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("no-such-model", {}, "registered configs are"),
        ("tiny-vit-bert", {"embed_dimension": 3}, "unknown field"),
        ("tiny-vit-bert", {"text.pooling": "max"}, "text.pooling"),
        ("tiny-vit-bert", {"image.image_size": 32}, "img_size"),
    ],
)
def test_bad_configs_raise_config_error(name: str, overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        get_model_config(name, **overrides)


def test_scratch_model_forward_shapes_normalisation_and_temperature(no_network: None) -> None:
    cfg = get_model_config("tiny-vit-bert", **TINY)
    model = build_model(cfg)
    assert isinstance(model, CLIPModel)
    names = [n for n, _ in model.named_parameters()]
    for prefix in ("image_tower.", "text_tower.", "image_proj.", "text_proj.", "logit_scale"):
        assert any(n.startswith(prefix) for n in names), prefix
    vocab = len(build_tokenizer_for(cfg))
    assert model.text_tower.transformer.embeddings.word_embeddings.num_embeddings == vocab

    tokens = _tokens(cfg, ["a red circle", "two small blue squares on the left", "a star"])
    pixels = torch.randn(3, 3, 32, 32)  # (B, 3, H, W)
    out = model({"pixels": pixels, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]})
    assert out["image_features"].shape == out["text_features"].shape == (3, 16)
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(out["text_features"].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert out["logit_scale"].shape == ()
    assert math.isclose(out["logit_scale"].item(), 1 / 0.07, rel_tol=1e-5)
    raw = model.encode_image(pixels, normalize=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3), atol=1e-3)

    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) > 100
    assert model({"pixels": pixels, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]})["logit_scale"].item() == pytest.approx(100.0)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_padding_does_not_change_text_embeddings(pooling: str) -> None:
    cfg = get_model_config("tiny-vit-bert", **{**TINY, "text": {**TINY["text"], "pooling": pooling}})
    model = build_model(cfg).eval()
    tokens = _tokens(cfg, ["a big green triangle at the top"])
    length = int(tokens["attention_mask"].sum())
    with torch.no_grad():
        full = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
        trimmed = model.encode_text(tokens["input_ids"][:, :length], tokens["attention_mask"][:, :length])
    assert torch.allclose(full, trimmed, atol=1e-5)


def test_local_pretrained_towers_are_loaded(no_network: None) -> None:
    cfg = get_model_config("efficientnet-lite0-minilm")
    model = build_model(cfg).eval()
    image_file = torch.load(resolve_path(cfg.image.weights), map_location="cpu", weights_only=True)
    assert torch.equal(model.image_tower.conv_stem.weight, image_file["_conv_stem.weight"])
    assert torch.equal(model.image_tower.bn2.running_var, image_file["_bn1.running_var"])  # last matched entry
    text_file = load_file(str(resolve_path(cfg.text.pretrained) / "model.safetensors"))
    embeddings = model.text_tower.transformer.embeddings.word_embeddings.weight
    assert torch.equal(embeddings, text_file["embeddings.word_embeddings.weight"])
    assert model.text_tower.pooling == "mean"

    tokens = _tokens(cfg, ["a photo of a red circle", "a blue square"])
    transform = build_transform(cfg, train=False)
    pixels = torch.stack([transform(Image.new("RGB", (64, 64), (200, 30, 30)))] * 2)  # (2, 3, 64, 64)
    assert float(pixels[0, 0, 0, 0]) == pytest.approx((200 / 255 - 0.498) / 0.502, abs=1e-5)  # (x - 127) / 128
    with torch.no_grad():
        out = model({"pixels": pixels, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]})
    assert out["image_features"].shape == out["text_features"].shape == (2, 128)
    assert torch.allclose(out["text_features"].norm(dim=-1), torch.ones(2), atol=1e-5)


def test_position_matched_weights_reject_a_shape_mismatch(tmp_path) -> None:
    cfg = get_model_config("efficientnet-lite0-minilm")
    model, _ = build_image_tower(cfg.image, load_weights=False)
    state = torch.load(resolve_path(cfg.image.weights), map_location="cpu", weights_only=True)
    state["_blocks.0._bn1.weight"] = torch.ones(7)
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    with pytest.raises(CheckpointError, match=r"tensor #7 '_blocks.0._bn1.weight' has shape \(7,\)"):
        load_image_weights(model, str(broken), "position")
    del state["_blocks.0._bn1.weight"]
    torch.save(state, broken)
    with pytest.raises(CheckpointError, match="cannot be matched by position"):
        load_image_weights(model, str(broken), "position")


def test_name_matched_weights_skip_a_classifier_head(tmp_path) -> None:
    cfg = get_model_config("tiny-vit-bert", **TINY)
    torch.manual_seed(0)
    source, width = build_image_tower(cfg.image)
    state = dict(source.state_dict(), **{"head.weight": torch.randn(10, width), "head.bias": torch.randn(10)})
    torch.save(state, tmp_path / "vit.pth")
    torch.manual_seed(1)
    target, _ = build_image_tower(cfg.image)
    load_image_weights(target, str(tmp_path / "vit.pth"), "name")
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_transforms_normalise_and_shift_deterministically() -> None:
    cfg = get_model_config("tiny-vit-bert", **{**TINY, "image": {**TINY["image"], "max_shift": 3}})
    array = np.zeros((48, 48, 3), dtype=np.uint8)
    array[10:20, 10:20] = 255
    image = Image.fromarray(array)
    plain = build_transform(cfg, train=False)(image)
    assert plain.shape == (3, 32, 32) and plain.dtype == torch.float32
    assert float(plain.min()) == pytest.approx(-1.0) and float(plain.max()) == pytest.approx(1.0)
    train = build_transform(cfg, train=True)
    shifted = [train(image, torch.Generator().manual_seed(s)) for s in range(6)]
    assert torch.equal(shifted[0], train(image, torch.Generator().manual_seed(0)))
    assert any(not torch.equal(s, plain) for s in shifted)


def test_embed_images_and_texts(tmp_path) -> None:
    cfg = get_model_config("tiny-vit-bert", **TINY)
    model = build_model(cfg).train()
    paths = []
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (32, 32), colour).save(paths[-1])
    images = embed_images(model, cfg, paths, [str(tmp_path.resolve())] * 3, batch_size=2)
    texts = embed_texts(model, cfg, build_tokenizer_for(cfg), ["a red square", "a green square", "blue", "x"], batch_size=3)
    assert images.shape == (3, 16) and texts.shape == (4, 16)
    assert torch.allclose(images.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not images.requires_grad and model.training  # no graph kept; the caller's mode is restored
    with torch.no_grad():
        single = model.eval().encode_image(build_transform(cfg, train=False)(Image.open(paths[1]))[None])
    assert torch.allclose(images[1], single[0], atol=1e-5)
