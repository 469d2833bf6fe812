"""Batched, gradient-free embedding of image files and texts with a trained model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from vlalign.data.tokenizers import tokenize
from vlalign.data.transforms import build_transform
from vlalign.errors import DatasetFormatError
from vlalign.models.clip import CLIPModel
from vlalign.models.config import ModelConfig


def _load_image(path: str) -> Image.Image:
    """Open one image file, naming it when it is missing or unreadable."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, ValueError) as exc:
        raise DatasetFormatError(f"{path}: cannot read the image ({exc}); fix or remove it from the manifest.") from exc


@torch.no_grad()
def embed_images(model: CLIPModel, cfg: ModelConfig, image_paths: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Unit-length embeddings of the image files, in order: (N, D). Runs in eval mode without gradients."""
    transform = build_transform(cfg, train=False)
    was_training = model.training
    model.eval()
    chunks = []
    for start in range(0, len(image_paths), batch_size):
        pixels = torch.stack([transform(_load_image(p)) for p in image_paths[start : start + batch_size]])  # (b, 3, H, W)
        chunks.append(model.encode_image(pixels))  # (b, D)
    model.train(was_training)
    return torch.cat(chunks) if chunks else torch.zeros(0, cfg.embed_dim)  # (N, D)


@torch.no_grad()
def embed_texts(
    model: CLIPModel, cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch_size: int = 256
) -> torch.Tensor:
    """Unit-length embeddings of the texts, in order: (M, D). Runs in eval mode without gradients."""
    was_training = model.training
    model.eval()
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenize(tokenizer, list(texts[start : start + batch_size]), cfg.text.context_length)
        length = max(int(tokens["attention_mask"].sum(dim=1).max()), 1)  # drop all-padding columns
        chunks.append(model.encode_text(tokens["input_ids"][:, :length], tokens["attention_mask"][:, :length]))  # (b, D)
    model.train(was_training)
    return torch.cat(chunks) if chunks else torch.zeros(0, cfg.embed_dim)  # (M, D)
