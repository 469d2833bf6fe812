"""Mixed image towers (several timm backbones, SPHINX) and sub-images, against direct computations with the
backbones themselves: the fused tokens and pooled vectors, the tiles and the global view, per-backbone
normalisation and local weights, freezing one backbone by parameter-name prefix, checkpoint round trips."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlalign.errors import ConfigError
from vlalign.models import build_model, get_model_config
from vlalign.models.mixed import CompositeImageTower, split_views
from vlalign.train import CheckpointStore, StageConfig, model_from_checkpoint, train_stage

from shared import TINY, make_manifest

CONVNET = {"name": "convnet", "timm_name": "convnext_atto",
           "timm_kwargs": {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]}}


def _cfg(**image):
    return get_model_config("tiny-vit-bert", **{**TINY, "image": {**TINY["image"], **image}})


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_manifest(tmp_path_factory.mktemp("images"))


def _backbone_outputs(backbone, pixels):
    features = backbone.forward_features(pixels)
    return features, backbone.forward_head(features, pre_logits=True)


def test_mixed_pooled_is_the_concatenation_of_each_backbones_pooled_vector() -> None:
    torch.manual_seed(0)
    model = build_model(_cfg(extra_backbones=[CONVNET])).eval()
    tower = model.image_tower
    assert isinstance(tower, CompositeImageTower) and list(tower.backbones) == ["main", "convnet"]
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith("image_tower.backbones.main.") for n in names)
    assert any(n.startswith("image_tower.backbones.convnet.") for n in names)
    assert model.image_proj.in_features == 32 + 32  # ViT width + ConvNeXt width, concatenated then projected
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens, pooled = model.image_outputs(pixels)
        vit_features, vit_pooled = _backbone_outputs(tower.backbones["main"], pixels)
        conv_features, conv_pooled = _backbone_outputs(tower.backbones["convnet"], pixels)
    assert torch.allclose(pooled, torch.cat([vit_pooled, conv_pooled], dim=1), atol=1e-6)
    # tokens: the ViT's 4x4 patch grid (class token dropped) with the ConvNet's 1x1 map resampled onto it
    grid = vit_features[:, 1:].transpose(1, 2).reshape(3, 32, 4, 4)
    conv = F.interpolate(conv_features, size=(4, 4), mode="bilinear", align_corners=False)
    assert tokens.shape == (3, 16, 64)
    assert torch.allclose(tokens, torch.cat([grid, conv], dim=1).flatten(2).transpose(1, 2), atol=1e-6)
    assert torch.allclose(model.encode_image(pixels), F.normalize(model.image_proj(pooled), dim=-1), atol=1e-6)


def test_mixed_tokens_mode_mean_pools_the_fused_tokens() -> None:
    model = build_model(_cfg(extra_backbones=[CONVNET], mix="tokens")).eval()
    with torch.no_grad():
        tokens, pooled = model.image_outputs(torch.randn(2, 3, 32, 32))
    assert torch.allclose(pooled, tokens.mean(dim=1), atol=1e-6)


def test_each_backbone_sees_pixels_in_its_own_normalisation(monkeypatch) -> None:
    own = {**CONVNET, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    model = build_model(_cfg(extra_backbones=[own])).eval()
    seen = {}
    for name, backbone in model.image_tower.backbones.items():
        original = backbone.forward_features
        monkeypatch.setattr(backbone, "forward_features",
                            lambda x, _o=original, _n=name: (seen.__setitem__(_n, x.clone()), _o(x))[1])
    raw = torch.rand(2, 3, 32, 32)  # pixels on the [0, 1] scale
    model.encode_image((raw - 0.5) / 0.5)  # the tower's own normalisation (mean = std = 0.5)
    assert torch.allclose(seen["main"], (raw - 0.5) / 0.5, atol=1e-6)
    mean, std = torch.tensor(own["mean"]).view(1, 3, 1, 1), torch.tensor(own["std"]).view(1, 3, 1, 1)
    assert torch.allclose(seen["convnet"], (raw - mean) / std, atol=1e-5)


def test_an_extra_backbone_loads_its_local_weights(tmp_path) -> None:
    import timm

    source = timm.create_model("convnext_atto", pretrained=False, num_classes=0, **CONVNET["timm_kwargs"])
    torch.save(source.state_dict(), tmp_path / "convnet.pt")
    cfg = _cfg(extra_backbones=[{**CONVNET, "weights": str(tmp_path / "convnet.pt")}])
    loaded = build_model(cfg).image_tower.backbones["convnet"].state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items())
    fresh = build_model(cfg, load_pretrained=False).image_tower.backbones["convnet"].state_dict()
    assert not all(torch.equal(fresh[k], v) for k, v in source.state_dict().items())


def test_split_views_are_the_tiles_and_an_antialiased_global_view() -> None:
    pixels = torch.randn(2, 3, 8, 8)
    views = split_views(pixels, 2)  # (2, 5, 3, 4, 4)
    assert views.shape == (2, 5, 3, 4, 4)
    assert torch.equal(views[:, 0], pixels[..., :4, :4]) and torch.equal(views[:, 1], pixels[..., :4, 4:])
    assert torch.equal(views[:, 2], pixels[..., 4:, :4]) and torch.equal(views[:, 3], pixels[..., 4:, 4:])
    assert torch.allclose(views[:, 4], F.interpolate(pixels, size=(4, 4), mode="bilinear", antialias=True))
    # a 1-pixel checkerboard survives in the tiles and averages out in the global view
    board = ((torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2).float().expand(1, 3, 8, 8)
    views = split_views(board, 2)
    assert float(views[0, :4].std()) > 0.4 and float(views[0, 4].std()) < 0.05


@pytest.mark.parametrize("fusion", ["concat", "mean"])
def test_sub_images_encode_each_view_independently(fusion) -> None:
    model = build_model(_cfg(image_size=64, sub_images=2, sub_image_fusion=fusion)).eval()
    backbone = model.image_tower.backbones["main"]
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens, pooled = model.image_outputs(pixels)
        per_view = [_backbone_outputs(backbone, v) for v in split_views(pixels, 2).unbind(1)]
    view_pooled = torch.stack([p for _, p in per_view], dim=1)  # (2, 5, 32)
    expected = view_pooled.flatten(1) if fusion == "concat" else view_pooled.mean(dim=1)
    assert torch.allclose(pooled, expected, atol=1e-5)
    assert model.image_proj.in_features == (5 * 32 if fusion == "concat" else 32)
    assert torch.allclose(tokens, torch.cat([f for f, _ in per_view], dim=1), atol=1e-5)  # (2, 5 * 17, 32)


def test_mixed_with_sub_images_round_trips_through_a_checkpoint(tmp_path, manifest) -> None:
    cfg = _cfg(image_size=64, sub_images=2, extra_backbones=[CONVNET])
    stage = StageConfig(name="s", max_steps=1, batch_size=8, warmup_steps=0, checkpoint_every=0,
                        caption_langs=["en"], device="cpu")
    final = train_stage(cfg, stage, manifest, None, CheckpointStore(tmp_path / "s"))
    model = model_from_checkpoint(tmp_path / "s" / "final.pt")
    assert all(torch.equal(v, final["model"][k]) for k, v in model.state_dict().items())
    assert not any(k.startswith("image_tower.scale_") for k in final["model"])  # re-normalisation is not a weight
    assert final["model_config"]["image"]["extra_backbones"][0]["name"] == "convnet"


def test_one_backbone_of_the_mix_is_frozen_by_prefix(tmp_path, manifest) -> None:
    cfg = _cfg(extra_backbones=[CONVNET])
    torch.manual_seed(0)
    start = build_model(cfg).state_dict()  # the stage builds the same fresh weights (seed 0)
    stage = StageConfig(name="s", max_steps=2, batch_size=8, lr=1e-2, warmup_steps=0, checkpoint_every=0,
                        caption_langs=["en"], device="cpu", seed=0,
                        trainable=["image_tower.backbones.convnet", "image_proj", "text_tower", "text_proj", "logit_scale"])
    final = train_stage(cfg, stage, manifest, None, CheckpointStore(tmp_path / "s"))["model"]
    main = [k for k in start if k.startswith("image_tower.backbones.main.")]
    conv = [k for k in start if k.startswith("image_tower.backbones.convnet.") and start[k].is_floating_point()]
    assert all(torch.equal(final[k], start[k]) for k in main)  # frozen
    assert any(not torch.equal(final[k], start[k]) for k in conv)  # trained
    model = build_model(cfg)
    from vlalign.train.optim import set_trainable

    set_trainable(model, ["image_tower.backbones.convnet", "image_proj"])
    model.train()
    assert not model.image_tower.backbones["main"].training and model.image_tower.backbones["convnet"].training


@pytest.mark.parametrize("image,match", [
    ({"sub_images": 2}, r"image.timm_kwargs.img_size must be equal to image.image_size / image.sub_images \(16\)"),
    ({"image_size": 33, "sub_images": 2}, "image.image_size must be a multiple of image.sub_images"),
    ({"extra_backbones": [CONVNET, CONVNET]}, r"image.extra_backbones\[1\].name must be a unique identifier"),
    ({"extra_backbones": [{**CONVNET, "name": "main"}]}, r"image.extra_backbones\[0\].name must be a unique"),
    ({"extra_backbones": [{**CONVNET, "size": 3}]}, r"image.extra_backbones\[0\]: unknown field\(s\) \['size'\]"),
    ({"mix": "sum"}, r"image.mix must be one of \['pooled', 'tokens'\]"),
    ({"sub_image_fusion": "max"}, r"image.sub_image_fusion must be one of"),
    ({"extra_backbones": [{**CONVNET, "timm_name": "no_such_net"}]}, r"image.extra_backbones\[0\] \(convnet\): timm cannot"),
])
def test_invalid_tower_options_are_named(image, match) -> None:
    with pytest.raises(ConfigError, match=match):
        build_model(_cfg(**image))
