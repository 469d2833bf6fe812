"""The objective seam: what a training stage optimises, separate from the model and the loop.

An objective is an ``nn.Module`` called as ``objective(out, batch)`` with the model's output dict and the batch,
returning a dict of named loss terms that includes the total ``"loss"``; the loop logs every term. After each
optimizer step the loop calls ``objective.after_step(model)`` (momentum teachers, feature queues). Buffers an
objective owns are saved in checkpoints and restored on resume; it never owns optimizer parameters of its own
(learnable quantities such as a temperature or a bias live in the model, so merging and serving see them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from vlalign.distributed.context import DistContext


@dataclass
class ObjectiveContext:
    """What an objective may know about the run (the loop itself knows neither the model type nor the world)."""

    dist: DistContext = field(default_factory=DistContext)  # rank and world size (for gathers across ranks)
    model: nn.Module | None = None  # the (unwrapped) model, for objectives that use its heads or teachers
    total_steps: int = 0  # optimizer steps of the stage (for ramps such as ALBEF's distillation weight)
    steps_per_epoch: int = 0  # optimizer steps in the first epoch


class Objective(nn.Module):
    """Base class of registered objectives."""

    #: Batch-first output keys through which the loss couples the samples of a batch (e.g. contrastive features).
    #: With gradient accumulation the loop computes them for the whole batch first and re-runs each micro-batch
    #: with its own features live, so the loss is exactly the full batch's. Empty: plain accumulation (the mean of
    #: micro-batch losses), right for objectives whose loss is a per-sample mean.
    coupled_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, context: ObjectiveContext | None = None) -> None:
        super().__init__()
        self.context = context or ObjectiveContext()

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, torch.Tensor]:  # noqa: D102
        raise NotImplementedError

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after every optimizer step with the (unwrapped) model and the step just taken (1-based)."""
