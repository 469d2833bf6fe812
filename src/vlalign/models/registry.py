"""Architecture registry: models are built from ``ModelConfig.arch`` by builders registered by name.

As timm's ``register_model``: a new architecture is a builder function decorated with :func:`register_arch`,
optionally with a dataclass of its options (``ModelConfig.arch_options`` is validated against it). Every
architecture keeps the small surface that evaluation, merging and serving use, so none of them branches on
the arch::

    model.encode_image(pixels (B, 3, H, W), normalize=True) -> (B, D)
    model.encode_text(input_ids (B, L), attention_mask (B, L), normalize=True) -> (B, D)
    model.scale() -> ()                    # the inverse temperature, at most max_logit_scale
    model(batch: dict) -> dict             # at least image_features, text_features, logit_scale
    model.config                           # its ModelConfig

A module with bounded parameters (the dual encoder's ``logit_scale``) defines ``constrain_parameters_()``, which
projects its own parameters back into range in place; the training loop calls :func:`apply_parameter_constraints` on the
unwrapped model after every optimizer step, so no arch needs a line of its own in the loop.

Checkpoints record the config (with its ``arch``), and :func:`vlalign.train.checkpoint.model_from_checkpoint`
rebuilds through :func:`build_model`, so loading dispatches on the arch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlalign.errors import ConfigError, dataclass_from_mapping


@dataclass(frozen=True)
class ArchEntry:
    """A registered architecture."""

    name: str  # the value of ModelConfig.arch
    builder: Callable[..., nn.Module]  # builder(cfg, vocab_size, load_pretrained, options) -> model
    options: type | None  # dataclass of ModelConfig.arch_options (None: the arch takes no options)


_ARCHS: dict[str, ArchEntry] = {}


def register_arch(name: str, options: type | None = None) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering ``builder(cfg, vocab_size, load_pretrained, options)`` as architecture ``name``."""

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _ARCHS and _ARCHS[name].builder is not builder:
            raise ConfigError(f"architecture {name!r} is registered twice ({_ARCHS[name].builder} and {builder}).")
        _ARCHS[name] = ArchEntry(name, builder, options)
        return builder

    return decorate


def list_archs() -> list[str]:
    """Names of the registered architectures."""
    _load_builtin()
    return sorted(_ARCHS)


def arch_entry(name: str) -> ArchEntry:
    """The registered architecture ``name``, or a ConfigError listing the known ones."""
    _load_builtin()
    if name not in _ARCHS:
        raise ConfigError(f"unknown model arch {name!r}; registered architectures are {sorted(_ARCHS)}.")
    return _ARCHS[name]


def arch_options(name: str, options: dict[str, Any] | None) -> Any:
    """``options`` validated against the arch's options dataclass (unknown fields are a ConfigError)."""
    entry = arch_entry(name)
    options = dict(options or {})
    if entry.options is None:
        if options:
            raise ConfigError(f"model arch {name!r} takes no arch_options, got {sorted(options)}.")
        return None
    return dataclass_from_mapping(entry.options, options, f"model arch {name!r}", "arch_options")


def build_model(cfg: Any, load_pretrained: bool = True) -> nn.Module:
    """Build the model of ``cfg`` (a ModelConfig) through its arch's builder; local pretrained tower weights are
    loaded unless ``load_pretrained`` is false. The text vocabulary size is the tokenizer's."""
    from vlalign.models.towers import build_tokenizer_for

    entry = arch_entry(cfg.arch)
    options = arch_options(cfg.arch, cfg.arch_options)
    return entry.builder(cfg, vocab_size=len(build_tokenizer_for(cfg)), load_pretrained=load_pretrained,
                         options=options)


def _load_builtin() -> None:
    """Import the modules that register the built-in architectures."""
    import vlalign.models.clip  # noqa: F401  (registers "dual")
    import vlalign.models.fusion  # noqa: F401  (registers "fusion")


# ------------------------------------------------------------------------------------------------
# Parameters that no training stage may unfreeze (momentum teachers, frozen reference copies)
# ------------------------------------------------------------------------------------------------

NEVER_TRAINABLE = "vlalign_never_trainable"  # module attribute set by mark_never_trainable


def mark_never_trainable(module: nn.Module) -> nn.Module:
    """Freeze ``module`` for good: its parameters get ``requires_grad=False`` and no ``trainable`` prefix of a
    stage (not even ``["all"]``) can unfreeze them, so they never reach an optimizer (e.g. EMA teachers)."""
    setattr(module, NEVER_TRAINABLE, True)
    for param in module.parameters():
        param.requires_grad_(False)
    return module


def never_trainable_names(model: nn.Module) -> set[str]:
    """Names of the parameters under modules marked with :func:`mark_never_trainable`."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        if getattr(module, NEVER_TRAINABLE, False):
            names.update(f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters())
    return names


# ------------------------------------------------------------------------------------------------
# Bounded parameters: projected back into range after every optimizer step
# ------------------------------------------------------------------------------------------------

CONSTRAIN_HOOK = "constrain_parameters_"  # method a module defines to clamp its own parameters in place


@torch.no_grad()
def apply_parameter_constraints(model: nn.Module) -> list[str]:
    """Call ``constrain_parameters_()`` on every submodule of ``model`` (itself included) that defines it, each
    clamping its *own* parameters in place (projected gradient descent, as open_clip's
    ``logit_scale.clamp_(0, math.log(100))`` after each step). Returns the qualified names of the modules called,
    root as ``""``. Call it on the unwrapped model after ``optimizer.step()`` and before anything copies the weights
    (an EMA teacher), so every copy sees the constrained values."""
    called = []
    for name, module in model.named_modules():
        hook = getattr(module, CONSTRAIN_HOOK, None)
        if callable(hook):
            hook()
            called.append(name)
    return called
