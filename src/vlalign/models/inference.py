"""Batched, gradient-free embedding of image files and texts with a trained model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from vlalign.data.images import decode_roots, open_image
from vlalign.data.tokenizers import tokenize
from vlalign.data.transforms import build_transform
from vlalign.models.clip import CLIPModel
from vlalign.models.config import ModelConfig


@torch.no_grad()
def embed_images(
    model: CLIPModel, cfg: ModelConfig, image_paths: Sequence[str], image_roots: Sequence[str], batch_size: int = 256
) -> torch.Tensor:
    """Unit-length embeddings of the image files, in order: (N, D). Runs in eval mode without gradients.

    ``image_roots[i]`` is the ``image_root`` value (allowed roots) of ``image_paths[i]``: an image is read only when
    it resolves inside them (:func:`vlalign.data.images.open_image`).
    """
    if len(image_roots) != len(image_paths):
        raise ValueError(f"embed_images: {len(image_paths)} paths but {len(image_roots)} image_roots; give one per path.")
    transform = build_transform(cfg, train=False)
    was_training = model.training
    model.eval()
    chunks = []
    for start in range(0, len(image_paths), batch_size):
        window = zip(image_paths[start : start + batch_size], image_roots[start : start + batch_size])
        pixels = torch.stack([transform(open_image(p, decode_roots(r))) for p, r in window])  # (b, 3, H, W)
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
