"""Image and text towers: timm / transformers wrappers with local-only weight loading.

Nothing here downloads: timm models are created with ``pretrained=False`` and loaded from a local
state-dict file; transformers models come from a ``BertConfig`` or from a local folder with
``local_files_only=True``.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig, BertModel, PreTrainedTokenizerBase

from vlalign.data.tokenizers import build_tokenizer
from vlalign.errors import CheckpointError, ConfigError, WeightsNotFoundError
from vlalign.models.config import ImageTowerConfig, ModelConfig, TextTowerConfig
from vlalign.paths import resolve_path


def create_backbone(timm_name: str, timm_kwargs: dict, weights: str | None, weights_match: str, load_weights: bool,
                    where: str = "image tower") -> nn.Module:
    """One timm backbone without classifier, from scratch, then loaded from its local weights file (if any and
    ``load_weights``)."""
    try:
        model = timm.create_model(timm_name, pretrained=False, num_classes=0, **timm_kwargs)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(
            f"{where}: timm cannot create {timm_name!r} with timm_kwargs={timm_kwargs} ({exc}). "
            "Check the architecture name (timm.list_models()) and its keyword arguments."
        ) from exc
    if load_weights and weights:
        load_image_weights(model, weights, weights_match)
    return model


def build_image_tower(cfg: ImageTowerConfig, load_weights: bool = True) -> tuple[nn.Module, int]:
    """Create the image tower and return it with its output feature width: the timm backbone (no classifier), or,
    with ``extra_backbones`` or ``sub_images > 1``, a :class:`vlalign.models.mixed.CompositeImageTower`.

    With ``load_weights``, each backbone's local weights file (if set) is loaded into it.
    """
    main = create_backbone(cfg.timm_name, cfg.timm_kwargs, cfg.weights, cfg.weights_match, load_weights)
    if not cfg.composite:
        return main, int(getattr(main, "head_hidden_size", None) or main.num_features)
    from vlalign.models.mixed import CompositeImageTower

    backbones = {"main": main}
    for index, extra in enumerate(cfg.extra_backbones):
        backbones[extra.name] = create_backbone(extra.timm_name, extra.timm_kwargs, extra.weights, extra.weights_match,
                                                load_weights, f"image.extra_backbones[{index}] ({extra.name})")
    tower = CompositeImageTower(cfg, backbones)
    return tower, tower.num_features


def _read_state_dict(spec: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """Load a plain state dict (weights_only) from the local file that ``spec`` names."""
    path = resolve_path(spec)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same thing here
        raise CheckpointError(f"{path}: cannot load weights with torch.load(weights_only=True): {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(state).__name__}.")
    return path, state


def _is_classifier_head(entries: list[tuple[str, torch.Tensor]], num_features: int) -> bool:
    """Whether ``entries`` is a (C, F) weight then a (C,) bias of a classifier over F = num_features."""
    if len(entries) != 2:
        return False
    (_, weight), (_, bias) = entries
    return weight.ndim == 2 and weight.shape[1] == num_features and bias.shape == (weight.shape[0],)


def load_image_weights(model: nn.Module, spec: str, match: str) -> None:
    """Load the state-dict file ``spec`` into the timm ``model`` (which has no classifier).

    ``match="name"`` requires the file's names to equal the model's; ``match="position"`` pairs the
    i-th tensor of the file with the i-th entry of ``model.state_dict()`` and checks the shapes one by
    one (for checkpoints saved by other EfficientNet implementations). In both modes a trailing
    classifier head in the file (a (C, F) weight and a (C,) bias) is ignored.
    """
    path, file_state = _read_state_dict(spec)
    target = model.state_dict()
    entries = list(file_state.items())
    num_features = int(model.num_features)
    if match == "name":
        extra = [(k, v) for k, v in entries if k not in target]
        if extra and _is_classifier_head(extra, num_features):
            entries = [(k, v) for k, v in entries if k in target]
        mapped = dict(entries)
    elif match == "position":
        if len(entries) == len(target) + 2 and _is_classifier_head(entries[-2:], num_features):
            entries = entries[:-2]
        if len(entries) != len(target):
            raise CheckpointError(
                f"{path}: holds {len(file_state)} tensors but {type(model).__name__} has {len(target)} "
                "state-dict entries (plus an optional classifier head), so the keys cannot be matched by position. "
                "Use a weights file saved from the same architecture, or weights_match: name."
            )
        mapped = {}
        for index, ((file_key, tensor), (model_key, expected)) in enumerate(zip(entries, target.items())):
            if tensor.shape != expected.shape:
                raise CheckpointError(
                    f"{path}: tensor #{index} {file_key!r} has shape {tuple(tensor.shape)} but the model's "
                    f"#{index} {model_key!r} has shape {tuple(expected.shape)}; the file does not match "
                    "this architecture by position. Check image.timm_name against the weights file."
                )
            mapped[model_key] = tensor
    else:
        raise ConfigError(f"image.weights_match={match!r}: expected 'name' or 'position'.")
    try:
        model.load_state_dict(mapped, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: does not fit {type(model).__name__}: {exc}") from exc


def image_tower_outputs(tower: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level and pooled outputs of a timm backbone created with ``num_classes=0``.

    Returns ``(tokens, pooled)``: tokens (B, T, C) are the backbone's final feature tokens (a ViT's prefix + patch
    tokens; a ConvNet's feature map flattened to h*w tokens), pooled (B, C) is exactly what ``tower(pixels)`` returns.
    A composite tower (:mod:`vlalign.models.mixed`) gives its fused tokens and pooled vector the same way.
    """
    if hasattr(tower, "outputs"):  # a composite tower (mixed backbones, sub-images): vlalign.models.mixed
        return tower.outputs(pixels)
    features = tower.forward_features(pixels)  # (B, T, C) for a ViT, (B, C, h, w) for a ConvNet
    pooled = tower.forward_head(features, pre_logits=True)  # (B, C)
    tokens = features.flatten(2).transpose(1, 2) if features.ndim == 4 else features  # (B, T, C)
    return tokens, pooled


class TextTower(nn.Module):
    """A transformers encoder followed by CLS or masked-mean pooling: (B, L) token ids -> (B, H)."""

    def __init__(self, transformer: nn.Module, pooling: str) -> None:
        super().__init__()
        self.transformer = transformer
        self.pooling = pooling
        self.output_dim = int(transformer.config.hidden_size)

    def outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens (B, L, H), pooled (B, H))`` for ``input_ids`` (B, L) with ``attention_mask`` (B, L)."""
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, H)
        if self.pooling == "cls":
            return hidden, hidden[:, 0]  # (B, L, H), (B, H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        return hidden, (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)  # (B, L, H), (B, H)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled sentence vectors for ``input_ids`` (B, L) with ``attention_mask`` (B, L) -> (B, H)."""
        return self.outputs(input_ids, attention_mask)[1]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in the transformer layers."""
        if enable:
            self.transformer.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.transformer.gradient_checkpointing_disable()


def build_text_tower(cfg: TextTowerConfig, vocab_size: int, load_weights: bool = True) -> TextTower:
    """A scratch BERT of ``vocab_size`` tokens, or the local pretrained model ``cfg.pretrained``.

    With ``load_weights=False`` a pretrained folder contributes only its architecture (config.json),
    e.g. when the weights come from a vlalign checkpoint anyway.
    """
    if cfg.pretrained is None:
        bert_config = BertConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size,
            max_position_embeddings=cfg.context_length,
            hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout,
            pad_token_id=0,
        )
        return TextTower(BertModel(bert_config, add_pooling_layer=False), cfg.pooling)
    folder = resolve_path(cfg.pretrained)
    if not (folder / "config.json").is_file():
        raise WeightsNotFoundError(
            f"text.pretrained={cfg.pretrained!r} resolves to {folder}, which has no config.json; "
            "point it at a local transformers model folder."
        )
    hf_config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    extra = {"add_pooling_layer": False} if hf_config.model_type == "bert" else {}
    if load_weights:
        transformer = AutoModel.from_pretrained(str(folder), local_files_only=True, **extra)
    else:
        transformer = AutoModel.from_config(hf_config, **extra)
    model_vocab = int(transformer.config.vocab_size)
    if vocab_size > model_vocab:
        raise ConfigError(
            f"text.vocab has {vocab_size} tokens but the pretrained model {folder} embeds only {model_vocab}; "
            "use the tokenizer shipped with the model (set text.vocab to the same folder)."
        )
    if cfg.context_length > transformer.config.max_position_embeddings:
        raise ConfigError(
            f"text.context_length={cfg.context_length} exceeds the {transformer.config.max_position_embeddings} "
            f"positions of {folder}; lower it."
        )
    return TextTower(transformer, cfg.pooling)


def build_tokenizer_for(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of ``cfg``'s text tower: from a vocab.txt file, or from a local tokenizer folder."""
    path = resolve_path(cfg.text.vocab)
    if path.is_dir():
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return build_tokenizer(path, lowercase=cfg.text.lowercase)
