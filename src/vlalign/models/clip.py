"""CLIP-style dual encoder: towers, linear projections into a shared space, learnable temperature."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlalign.models.config import ModelConfig
from vlalign.models.towers import build_image_tower, build_text_tower, build_tokenizer_for


class CLIPModel(nn.Module):
    """Image tower + text tower + projections + ``logit_scale`` (parameter prefixes per INTERFACES §5).

    Parameters are named ``image_tower.*``, ``text_tower.*``, ``image_proj.*``, ``text_proj.*`` and
    ``logit_scale``; training stages freeze or train them by these prefixes.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, load_pretrained: bool = True) -> None:
        super().__init__()
        self.config = cfg
        self.image_tower, image_dim = build_image_tower(cfg.image, load_weights=load_pretrained)
        self.text_tower = build_text_tower(cfg.text, vocab_size, load_weights=load_pretrained)
        self.image_proj = nn.Linear(image_dim, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(self.text_tower.output_dim, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(cfg.init_logit_scale))  # () log of the inverse temperature
        self.max_log_scale = math.log(cfg.max_logit_scale)

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, D) image embeddings (unit length if ``normalize``)."""
        features = self.image_proj(self.image_tower(pixels))  # (B, D)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, L) token ids and mask -> (B, D) text embeddings (unit length if ``normalize``)."""
        features = self.text_proj(self.text_tower(input_ids, attention_mask))  # (B, D)
        return F.normalize(features, dim=-1) if normalize else features

    def scale(self) -> torch.Tensor:
        """exp(logit_scale) clamped at ``max_logit_scale``: the inverse temperature 1/tau, shape ()."""
        return self.logit_scale.clamp(max=self.max_log_scale).exp()

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised features of a batch of pairs and the clamped logit scale."""
        return {
            "image_features": self.encode_image(pixels),  # (B, D)
            "text_features": self.encode_text(input_ids, attention_mask),  # (B, D)
            "logit_scale": self.scale(),  # ()
        }


def build_model(cfg: ModelConfig, load_pretrained: bool = True) -> CLIPModel:
    """Build the model of ``cfg``; local pretrained tower weights are loaded unless ``load_pretrained`` is false.

    The scratch text tower's vocabulary size is the tokenizer's (``build_tokenizer_for(cfg)``).
    """
    return CLIPModel(cfg, vocab_size=len(build_tokenizer_for(cfg)), load_pretrained=load_pretrained)
