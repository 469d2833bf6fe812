"""AdamW with CLIP-style decay groups, and a linear-warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from vlalign.errors import ConfigError


def set_trainable(model: nn.Module, prefixes: list[str]) -> list[str]:
    """Freeze every parameter except those whose name starts with one of ``prefixes`` (``["all"]`` = all).

    Returns the names of the trainable parameters. A prefix matching no parameter is a
    :class:`ConfigError`, so a typo cannot silently freeze the whole model. Parameters under modules marked
    never-trainable (:func:`vlalign.models.registry.mark_never_trainable`, e.g. momentum teachers) stay frozen
    whatever the prefixes say.
    """
    from vlalign.models.registry import never_trainable_names

    never = never_trainable_names(model)
    names = [name for name, _ in model.named_parameters()]
    if prefixes != ["all"]:
        unmatched = [p for p in prefixes if not any(n.startswith(p) for n in names)]
        if unmatched:
            tops = sorted({n.split(".")[0] for n in names})
            raise ConfigError(f"trainable prefixes {unmatched} match no parameter; top-level names are {tops}, or use ['all'].")
    trainable = []
    for name, param in model.named_parameters():
        wanted = prefixes == ["all"] or any(name.startswith(p) for p in prefixes)
        param.requires_grad_(wanted and name not in never)
        if param.requires_grad:
            trainable.append(name)
    return trainable


def no_decay_names(model: nn.Module) -> set[str]:
    """Parameters exempt from weight decay: 1-D tensors (biases, norm gains), ``logit_scale``, and those a
    submodule lists in its ``no_weight_decay()`` (timm convention, e.g. a ViT's ``pos_embed`` and ``cls_token``)."""
    names = {name for name, param in model.named_parameters() if param.ndim < 2 or name == "logit_scale"}
    for prefix, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            names.update(f"{prefix}.{n}" if prefix else n for n in listed())
    return names


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on all of them but :func:`no_decay_names`."""
    exempt = no_decay_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name in exempt else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.98), eps=1e-6)


class WarmupCosine:
    """LR multiplier: linear from 1/(warmup+1) to 1 over ``warmup_steps``, then cosine to ``min_ratio`` at ``total_steps``."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float) -> None:
        if total_steps < 1:
            raise ConfigError(f"total_steps={total_steps}: a schedule needs at least one step.")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule (call ``scheduler.step()`` after every optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, min_lr_ratio))
