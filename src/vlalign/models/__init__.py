"""Dual-encoder models built from named configs (see INTERFACES §5)."""

from vlalign.data.transforms import build_transform
from vlalign.models.clip import CLIPModel
from vlalign.models.registry import (
    apply_parameter_constraints, build_model, list_archs, mark_never_trainable, register_arch,
)
from vlalign.models.config import ImageTowerConfig, ModelConfig, TextTowerConfig, get_model_config, list_models
from vlalign.models.towers import build_tokenizer_for

__all__ = [
    "CLIPModel",
    "ImageTowerConfig",
    "ModelConfig",
    "TextTowerConfig",
    "apply_parameter_constraints",
    "build_model",
    "list_archs",
    "mark_never_trainable",
    "register_arch",
    "build_tokenizer_for",
    "build_transform",
    "get_model_config",
    "list_models",
]
