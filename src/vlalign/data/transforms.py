"""Image transforms: PIL image -> normalised (3, H, W) float tensor.

The transform is split in two halves so a dataset can decode and resize every image once and cache
it as uint8 (:meth:`ImageTransform.prepare`), then run only the cheap random part per sample
(:meth:`ImageTransform.finish`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:  # vlalign.models imports this module; a runtime import would be circular
    from vlalign.models.config import ModelConfig


class ImageTransform:
    """Resize to a square, optionally shift at random (training), scale to [0, 1] and normalise."""

    def __init__(self, image_size: int, mean: list[float], std: list[float], max_shift: int = 0) -> None:
        self.image_size = image_size
        self.max_shift = max_shift
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)  # (3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)  # (3, 1, 1)

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """Deterministic half: RGB, resized to ``image_size`` -> (3, H, W) uint8."""
        image = image.convert("RGB")
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # (3, H, W)

    def finish(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Random half: (3, H, W) uint8 -> (3, H, W) normalised float, shifted when ``max_shift`` > 0."""
        if self.max_shift > 0:
            pixels = self._shift(pixels, generator)  # (3, H, W)
        return (pixels.float() / 255.0 - self.mean) / self.std  # (3, H, W)

    def _shift(self, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Translate by (dy, dx) in [-max_shift, max_shift], filling with the replicated border."""
        s = self.max_shift
        dy, dx = (int(v) for v in torch.randint(-s, s + 1, (2,), generator=generator))
        padded = torch.nn.functional.pad(pixels[None].float(), (s, s, s, s), mode="replicate")[0]  # (3, H+2s, W+2s)
        h, w = pixels.shape[1:]
        return padded[:, s + dy : s + dy + h, s + dx : s + dx + w].to(pixels.dtype)  # (3, H, W)

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        """PIL image -> (3, H, W) normalised float tensor."""
        return self.finish(self.prepare(image), generator)


def build_transform(cfg: ModelConfig, train: bool) -> ImageTransform:
    """The image transform of ``cfg``'s image tower; random shifts only when ``train`` is true."""
    image = cfg.image
    return ImageTransform(image.image_size, image.mean, image.std, max_shift=image.max_shift if train else 0)
