"""Where and how a stage computes: device, precision (autocast, gradient scaler), TF32, distributed wrapping.

All of it is applied here, in one place, from the stage config; the training loop only calls
``runtime.autocast()``, ``runtime.to_device(batch)``, ``runtime.backward(loss)`` and ``runtime.step(...)``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlalign.distributed.context import DistContext
from vlalign.errors import ConfigError

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> this rank's GPU when CUDA is available, else the CPU; ``cuda`` without a GPU is an error."""
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("stage device='cuda' but no CUDA GPU is visible to torch; set device: auto or cpu.")
    if name in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


@dataclass
class Runtime:
    """The device, precision and process group of a stage."""

    device: torch.device  # where the model and batches live
    precision: str = "fp32"  # fp32 | bf16 | fp16
    dist: DistContext = field(default_factory=DistContext)  # rank / world
    pin_memory: bool = False  # pinned host memory and non-blocking copies (CUDA only)
    scaler: Any = None  # torch.amp.GradScaler for fp16, else None

    @classmethod
    def create(cls, device: str, precision: str, dist: DistContext, tf32: bool = True, pin_memory: bool = True) -> Runtime:
        """The runtime of a stage config's ``device``, ``precision``, ``tf32`` and ``pin_memory`` fields."""
        resolved = resolve_device(device, dist.local_rank)
        if resolved.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
            torch.set_float32_matmul_precision("high" if tf32 else "highest")
        scaler = torch.amp.GradScaler(resolved.type) if precision == "fp16" else None
        return cls(resolved, precision, dist, pin_memory and resolved.type == "cuda", scaler)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype (None for fp32)."""
        return _DTYPES[self.precision]

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for the forward pass and the loss (no-op in fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch's tensors on the device (non-blocking from pinned memory on CUDA)."""
        if self.device.type == "cpu":
            return batch
        return {k: v.to(self.device, non_blocking=self.pin_memory) if torch.is_tensor(v) else v for k, v in batch.items()}

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, scaled for fp16."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], grad_clip: float | None) -> None:
        """Unscale (fp16), clip the global gradient norm, and take the optimizer step."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def wrap(self, model: nn.Module, compile_model: bool = False) -> nn.Module:
        """The model as the training step calls it: on the device, in DistributedDataParallel with several ranks,
        compiled when asked. The unwrapped model is what checkpoints, objectives and ``after_step`` see."""
        model.to(self.device)
        wrapped = model
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                forward_sync_buffers=False,  # buffers (queues, counters) are per-rank state, never overwritten
            )
        if compile_model:
            wrapped = torch.compile(wrapped)
        return wrapped
