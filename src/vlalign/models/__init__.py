"""Dual-encoder models built from named configs (see INTERFACES §5)."""

from vlalign.data.transforms import build_transform
from vlalign.models.clip import CLIPModel, build_model
from vlalign.models.config import ImageTowerConfig, ModelConfig, TextTowerConfig, get_model_config, list_models
from vlalign.models.towers import build_tokenizer_for

__all__ = [
    "CLIPModel",
    "ImageTowerConfig",
    "ModelConfig",
    "TextTowerConfig",
    "build_model",
    "build_tokenizer_for",
    "build_transform",
    "get_model_config",
    "list_models",
]
