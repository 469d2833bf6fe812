"""CLIP-style dual encoder (arch ``dual``): towers, linear projections into a shared space, learnable temperature."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlalign.models.config import ModelConfig
from vlalign.models.registry import build_model, register_arch
from vlalign.models.towers import build_image_tower, build_text_tower, image_tower_outputs

__all__ = ["CLIPModel", "build_model"]


class CLIPModel(nn.Module):
    """Image tower + text tower + projections + ``logit_scale`` (parameter prefixes per INTERFACES §5).

    Parameters are named ``image_tower.*``, ``text_tower.*``, ``image_proj.*``, ``text_proj.*``, ``logit_scale``
    (and ``logit_bias`` when ``init_logit_bias`` is set); training stages freeze or train them by these prefixes.
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
        if cfg.init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(cfg.init_logit_bias)))  # () SigLIP's learnable bias

    def image_outputs(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) pixels -> ``(tokens (B, T, C), pooled (B, C))`` of the image tower."""
        return image_tower_outputs(self.image_tower, pixels)

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, D) image embeddings (unit length if ``normalize``)."""
        features = self.image_proj(self.image_outputs(pixels)[1])  # (B, D)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, L) token ids and mask -> (B, D) text embeddings (unit length if ``normalize``)."""
        features = self.text_proj(self.text_tower(input_ids, attention_mask))  # (B, D)
        return F.normalize(features, dim=-1) if normalize else features

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), at most ``max_logit_scale``: the inverse temperature 1/tau, shape ().

        Training keeps the parameter in [0, ln max_logit_scale] by :meth:`constrain_parameters_` after every
        optimizer step (open_clip's ``logit_scale.clamp_(0, math.log(100))``), so the gradient flows at every value
        the parameter can take, the cap included. This forward guard only caps values *above* the bound (weights
        from before that constraint existed, or edited by hand), and it keeps the gradient at the bound itself:
        ``Tensor.clamp`` with a number as bound gives gradient 0 at equality in torch 2.14, which would freeze a
        parameter that the in-place clamp has just set to the cap.
        """
        cap = self.logit_scale.new_tensor(self.max_log_scale)  # () in the parameter's dtype, as the in-place clamp
        return torch.where(self.logit_scale > cap, cap, self.logit_scale).exp()  # ()

    @torch.no_grad()
    def constrain_parameters_(self) -> None:
        """Project this module's own bounded parameters back into range, in place (called after every optimizer
        step through :func:`vlalign.models.registry.apply_parameter_constraints`): ``logit_scale`` into
        [0, ln max_logit_scale], i.e. 1 <= exp(logit_scale) <= max_logit_scale (temperature in
        [1/max_logit_scale, 1]), as open_clip. A frozen ``logit_scale`` is left as loaded (frozen weights never
        change; :meth:`scale` caps it). ``logit_bias`` (SigLIP) has no bound, as in big_vision and open_clip."""
        if self.logit_scale.requires_grad:
            cap = self.logit_scale.new_tensor(self.max_log_scale)  # () rounded as in scale(), so equality passes there
            self.logit_scale.clamp_(0.0, float(cap))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute tower activations in the backward pass instead of storing them (less memory, more compute)."""
        self.image_tower.set_grad_checkpointing(enable)
        self.text_tower.set_grad_checkpointing(enable)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One dict in, one dict out: normalised features, the clamped logit scale (and bias), and the towers'
        token-level outputs for objectives that need them."""
        image_tokens, image_pooled = self.image_outputs(batch["pixels"])  # (B, T, C), (B, C)
        text_tokens, text_pooled = self.text_tower.outputs(batch["input_ids"], batch["attention_mask"])  # (B, L, H), (B, H)
        out = {
            "image_features": F.normalize(self.image_proj(image_pooled), dim=-1),  # (B, D)
            "text_features": F.normalize(self.text_proj(text_pooled), dim=-1),  # (B, D)
            "logit_scale": self.scale(),  # ()
            "image_tokens": image_tokens,  # (B, T, C)
            "text_tokens": text_tokens,  # (B, L, H)
            "text_mask": batch["attention_mask"],  # (B, L)
        }
        if hasattr(self, "logit_bias"):
            out["logit_bias"] = self.logit_bias  # ()
        return out


@register_arch("dual")
def build_dual(cfg: ModelConfig, vocab_size: int, load_pretrained: bool = True, options: None = None) -> CLIPModel:
    """The CLIP-style dual encoder."""
    return CLIPModel(cfg, vocab_size=vocab_size, load_pretrained=load_pretrained)
