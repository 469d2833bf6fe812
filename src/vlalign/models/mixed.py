"""SPHINX-style image towers: several timm backbones mixed into one representation, and high-resolution images
encoded as sub-images.

Both are options of the image tower (``ImageTowerConfig.extra_backbones``, ``mix``, ``sub_images``,
``sub_image_fusion``), not architectures: every arch builds its image tower with
:func:`vlalign.models.towers.build_image_tower` and reads it through
:func:`vlalign.models.towers.image_tower_outputs`, so the dual encoder, the ALBEF/BLIP fusion arch and every
objective get mixed encoders and sub-images without a line of their own.

**Mixed encoders.** The tower holds ``backbones``, a ModuleDict: ``main`` (``image.timm_name``) and one entry per
``image.extra_backbones[i].name``, so their weights are ``image_tower.backbones.<name>.*`` and a training stage
freezes or trains each one by that prefix. Each backbone sees the same pixels (re-normalised to its own mean/std
when it declares them). Their outputs are fused:

* spatial tokens: a ViT's patch tokens (prefix tokens dropped) or a ConvNet's feature map, each resampled to the
  main backbone's token grid (bilinear up, area down), concatenated along channels -> (B, g*g, sum C_k);
* the pooled vector: ``mix: pooled`` concatenates each backbone's own pooled vector -> (B, sum C_k);
  ``mix: tokens`` mean-pools the fused tokens -> (B, sum C_k).

The arch's ``image_proj`` then projects the concatenation (SPHINX: "concatenated, then projected").

**Sub-images.** With ``sub_images = k > 1`` the input is a k x k times larger image (``image_size = k * tile``).
It is cut into k*k tiles of ``tile`` pixels plus one global view (the whole image downsampled to ``tile`` with
anti-aliasing), V = k*k + 1 views, all encoded independently in one batch of B*V. The V pooled vectors are
concatenated ((B, V * P), then projected) or averaged ((B, P)); the tokens of all views are concatenated along the
token axis ((B, V * T, C)). Details smaller than what survives the downsampling are seen only by the tiles.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlalign.errors import ConfigError
from vlalign.models.config import BackboneConfig, ImageTowerConfig


def split_views(pixels: torch.Tensor, k: int) -> torch.Tensor:
    """(B, 3, k*t, k*t) -> (B, k*k + 1, 3, t, t): the k x k tiles in row-major order, then the global view.

    The global view is the whole image resized to t x t with anti-aliased bilinear filtering, so a pattern finer
    than the downsampling factor averages out in it and is visible only in the tiles.
    """
    b, c, h, w = pixels.shape
    if h != w or h % k:
        raise ConfigError(f"sub-images: expected square images whose side is a multiple of {k}, got {h}x{w}; "
                          "set image.image_size to k times the backbones' input size.")
    t = h // k
    tiles = pixels.reshape(b, c, k, t, k, t).permute(0, 2, 4, 1, 3, 5).reshape(b, k * k, c, t, t)  # (B, k*k, 3, t, t)
    overview = F.interpolate(pixels, size=(t, t), mode="bilinear", align_corners=False, antialias=True)  # (B, 3, t, t)
    return torch.cat([tiles, overview[:, None]], dim=1)  # (B, k*k+1, 3, t, t)


def spatial_map(backbone: nn.Module, features: torch.Tensor, name: str) -> torch.Tensor:
    """A backbone's ``forward_features`` output as a (B, C, h, w) map: a ConvNet's as is, a ViT's patch tokens
    (its ``num_prefix_tokens`` class/register tokens dropped) laid out on their square grid."""
    if features.ndim == 4:
        return features  # (B, C, h, w)
    if features.ndim != 3:
        raise ConfigError(f"image tower backbone {name!r}: forward_features gave shape {tuple(features.shape)}; "
                          "expected (B, T, C) tokens or a (B, C, h, w) feature map.")
    prefix = int(getattr(backbone, "num_prefix_tokens", 0))
    patches = features[:, prefix:]  # (B, g*g, C)
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise ConfigError(f"image tower backbone {name!r}: {patches.shape[1]} patch tokens do not form a square grid, "
                          "so they cannot be mixed token-wise; use mix: pooled or a backbone with a square grid.")
    return patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], side, side)  # (B, C, g, g)


def resample(grid: torch.Tensor, side: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, side, side): area averaging to shrink, bilinear interpolation to grow."""
    if grid.shape[-2:] == (side, side):
        return grid
    if grid.shape[-1] >= side and grid.shape[-2] >= side:
        return F.adaptive_avg_pool2d(grid, side)  # (B, C, side, side)
    return F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)  # (B, C, side, side)


class CompositeImageTower(nn.Module):
    """Mixed backbones and/or sub-images behind the tower surface ``outputs(pixels) -> (tokens, pooled)``."""

    def __init__(self, cfg: ImageTowerConfig, backbones: dict[str, nn.Module]) -> None:
        super().__init__()
        self.backbones = nn.ModuleDict(backbones)  # "main" first, then the extra backbones in config order
        self.mix = cfg.mix
        self.sub_images = cfg.sub_images
        self.fusion = cfg.sub_image_fusion
        self.tile = cfg.tile_size
        extras = {b.name: b for b in cfg.extra_backbones}
        for name in self.backbones:  # re-normalisation x * a + c from the tower's mean/std to the backbone's own
            scale, shift = _renormalisation(cfg, extras.get(name))
            self.register_buffer(f"scale_{name}", scale, persistent=False)  # (1, 3, 1, 1)
            self.register_buffer(f"shift_{name}", shift, persistent=False)  # (1, 3, 1, 1)
        widths = [_pooled_width(b) for b in self.backbones.values()]
        self.view_dim = sum(widths)  # P: width of one view's pooled vector
        views = self.sub_images ** 2 + 1 if self.sub_images > 1 else 1
        self.num_features = self.view_dim * (views if self.fusion == "concat" else 1)

    def _encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, 3, t, t) views -> (tokens (M, T, C), pooled (M, P)) of the mixed backbones."""
        if len(self.backbones) == 1:
            backbone = self.backbones["main"]
            features = backbone.forward_features(pixels)  # (M, T, C) or (M, C, h, w)
            pooled = backbone.forward_head(features, pre_logits=True)  # (M, C)
            return (features.flatten(2).transpose(1, 2) if features.ndim == 4 else features), pooled
        maps, pooled = [], []
        for name, backbone in self.backbones.items():
            x = pixels * getattr(self, f"scale_{name}") + getattr(self, f"shift_{name}")  # (M, 3, t, t)
            features = backbone.forward_features(x)  # (M, T_k, C_k) or (M, C_k, h_k, w_k)
            pooled.append(backbone.forward_head(features, pre_logits=True))  # (M, C_k)
            maps.append(spatial_map(backbone, features, name))  # (M, C_k, g_k, g_k)
        side = maps[0].shape[-1]  # the main backbone's grid
        fused = torch.cat([resample(m, side) for m in maps], dim=1)  # (M, sum C_k, g, g)
        tokens = fused.flatten(2).transpose(1, 2)  # (M, g*g, sum C_k)
        vector = torch.cat(pooled, dim=1) if self.mix == "pooled" else tokens.mean(dim=1)  # (M, sum C_k)
        return tokens, vector

    def outputs(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> ``(tokens (B, T', C), pooled (B, num_features))``."""
        if self.sub_images == 1:
            return self._encode(pixels)
        b = pixels.shape[0]
        views = split_views(pixels, self.sub_images)  # (B, V, 3, t, t)
        n_views = views.shape[1]
        tokens, pooled = self._encode(views.flatten(0, 1))  # (B*V, T, C), (B*V, P)
        tokens = tokens.reshape(b, n_views * tokens.shape[1], tokens.shape[2])  # (B, V*T, C)
        pooled = pooled.reshape(b, n_views, pooled.shape[1])  # (B, V, P)
        return tokens, (pooled.flatten(1) if self.fusion == "concat" else pooled.mean(dim=1))  # (B, V*P) or (B, P)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, num_features) pooled features, like a timm model created with ``num_classes=0``."""
        return self.outputs(pixels)[1]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in every backbone."""
        for backbone in self.backbones.values():
            backbone.set_grad_checkpointing(enable)

    def train(self, mode: bool = True) -> CompositeImageTower:
        """Train mode for the backbones that have a trainable parameter; a frozen backbone stays in eval mode (no
        dropout, fixed batch-norm statistics), so freezing one backbone of the mix by prefix really freezes it."""
        super().train(mode)
        for backbone in self.backbones.values():
            if mode and not any(p.requires_grad for p in backbone.parameters()):
                backbone.eval()
        return self


def _pooled_width(backbone: nn.Module) -> int:
    return int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)


def _renormalisation(cfg: ImageTowerConfig, backbone: BackboneConfig | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, c) with x_own = x * a + c, mapping pixels normalised with the tower's mean/std to the backbone's."""
    mean = torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1)  # (1, 3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1)  # (1, 3, 1, 1)
    own_mean = torch.tensor(backbone.mean, dtype=torch.float32).view(1, 3, 1, 1) if backbone and backbone.mean else mean
    own_std = torch.tensor(backbone.std, dtype=torch.float32).view(1, 3, 1, 1) if backbone and backbone.std else std
    return std / own_std, (mean - own_mean) / own_std  # x_own = (x * std + mean - own_mean) / own_std
