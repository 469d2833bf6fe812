"""One training stage: the loop behind ``vlalign train``, the Kedro training node, torchrun and a Kubernetes pod.

The loop calls ``model(batch)`` (one dict in, one dict out), the stage's objective, backward, the optimizer, the
model's parameter constraints (:func:`~vlalign.models.registry.apply_parameter_constraints`), and
``objective.after_step``; it logs every loss term. It knows neither the model type (the arch registry builds it) nor
the world size (the runtime wraps the model in DDP and the data source splits the batches); device and precision are
applied in one place (:class:`~vlalign.train.runtime.Runtime`). It is resumable step by step: checkpoints hold the
model, optimizer, scheduler, gradient scaler, objective buffers, RNG states and the data-stream position.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from vlalign.data.datasets import ImageTextDataset
from vlalign.data.transforms import build_transform
from vlalign.distributed.context import DistContext, all_reduce_mean, current
from vlalign.errors import CheckpointError, ConfigError, DatasetFormatError
from vlalign.models.config import ModelConfig
from vlalign.models.registry import apply_parameter_constraints, build_model
from vlalign.models.towers import build_tokenizer_for
from vlalign.objectives import Objective, ObjectiveContext, build_objective
from vlalign import reproducibility
from vlalign.train.checkpoint import FORMAT, CheckpointStore, check_checkpoint, load_checkpoint, rng_state, set_rng_state
from vlalign.train.config import StageConfig
from vlalign.train.data import (
    MemoryData, ShardData, ShardSampleDecoder, TrainData, manifest_fingerprint, memory_dataset_from_shards,
)
from vlalign.train.optim import build_optimizer, build_scheduler, set_trainable
from vlalign.train.runtime import Runtime

log = logging.getLogger(__name__)

#: Stage fields that do not change the trained weights; a checkpoint still resumes when only they differ.
RESUME_INSENSITIVE = ("num_workers", "log_every", "checkpoint_every", "device", "compile", "pin_memory", "compute",
                      "tf32")


class TrainCallback(Protocol):
    """Receives training progress; e.g. an experiment tracker. Called on rank 0 only."""

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        """Every ``log_every`` steps (and at the last step): every loss term, ``lr``, ``temperature``, ``logit_scale``."""

    def on_checkpoint(self, path: Path, step: int) -> None:
        """After a checkpoint was written to ``path`` at ``step``."""


def weights_fingerprint(init: dict[str, Any] | None) -> str | None:
    """sha256 over the initial weights (names and bytes), None without an init checkpoint."""
    if init is None:
        return None
    digest = hashlib.sha256()
    for name, tensor in sorted(init["model"].items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def training_inputs_fingerprint(train_rows: pd.DataFrame, init: dict[str, Any] | None) -> dict[str, str | None]:
    """sha256 of the training rows and of the initial weights: what a stage's result depends on besides configs."""
    return {"data_sha256": manifest_fingerprint(train_rows), "init_weights_sha256": weights_fingerprint(init)}


def build_train_data(data: Any, model_cfg: ModelConfig, stage: StageConfig, dist: DistContext,
                     runtime: Runtime) -> TrainData:
    """The data source of a stage: ``data`` is a manifest (its ``train`` rows, cached in RAM), a shard index
    (streamed, or cached in RAM with ``cache_in_memory``), or a ready :class:`TrainData`."""
    if isinstance(data, TrainData):
        return data
    transform = build_transform(model_cfg, train=True)
    tokenizer = build_tokenizer_for(model_cfg)
    per_rank = stage.batch_size // dist.world_size
    pin = runtime.pin_memory
    if isinstance(data, pd.DataFrame):
        rows = data[data["split"] == "train"] if "split" in data.columns else data
        if rows.empty:
            raise DatasetFormatError(f"the manifest has no split == 'train' rows (splits: {sorted(data['split'].unique())}).")
        dataset = ImageTextDataset(rows, transform, tokenizer, model_cfg.text.context_length, stage.caption_langs,
                                   seed=stage.seed)
        return MemoryData(dataset, stage.batch_size, stage.seed, dist.rank, dist.world_size, stage.num_workers, pin,
                          fingerprint=manifest_fingerprint(rows))
    decoder = ShardSampleDecoder(transform, tokenizer, model_cfg.text.context_length, stage.caption_langs, stage.seed)
    if stage.cache_in_memory:
        dataset, fingerprint = memory_dataset_from_shards(data, decoder)
        return MemoryData(dataset, stage.batch_size, stage.seed, dist.rank, dist.world_size, stage.num_workers, pin,
                          fingerprint=fingerprint)
    return ShardData(data, decoder, per_rank, stage.seed, dist.rank, dist.world_size, stage.num_workers,
                     stage.shuffle_buffer, pin)


def _resume_key(stage: StageConfig) -> dict[str, Any]:
    return {k: v for k, v in stage.to_dict().items() if k not in RESUME_INSENSITIVE}


def _stored_run(
    store: CheckpointStore, model_cfg: ModelConfig, stage: StageConfig, inputs: dict[str, Any]
) -> dict[str, Any] | None:
    """The store's latest checkpoint if it is a run of this very stage, model, data and initial weights.

    It may be unfinished (training resumes from it) or completed (it is the result, reused as is).
    """
    path = store.latest()
    if path is None:
        return None
    ckpt = load_checkpoint(path)
    if ckpt["stage_config"].get("name") != stage.name:
        return None
    saved = {k: v for k, v in StageConfig.from_dict(ckpt["stage_config"]).to_dict().items() if k not in RESUME_INSENSITIVE}
    if saved != _resume_key(stage) or ckpt["model_config"] != model_cfg.to_dict() or ckpt.get("inputs") != inputs:
        log.warning(
            "%s: stage %r was run with another configuration, training data or initial weights; "
            "starting the stage afresh.", path, stage.name,
        )
        return None
    if ckpt["completed"]:
        log.info("stage %r already completed with these inputs (%s); reusing it", stage.name, path)
    else:
        log.info("resuming stage %r from %s at step %d", stage.name, path, ckpt["step"])
    return ckpt


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Strictly load ``state`` into ``model``, naming ``where`` the weights came from on a mismatch."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{where}: its weights do not fit model {model.config.name!r}: {exc}") from exc


def _micro_batches(batch: dict[str, Any], parts: int) -> list[dict[str, Any]]:
    """Split a batch into ``parts`` equal micro-batches along dim 0 (tensors) or slices (lists)."""
    if parts == 1:
        return [batch]
    size = next(len(v) for v in batch.values() if torch.is_tensor(v) and v.ndim > 0) // parts
    return [{k: (v[j * size:(j + 1) * size] if (torch.is_tensor(v) and v.ndim > 0) or isinstance(v, list) else v)
             for k, v in batch.items()} for j in range(parts)]


def _rng_snapshot(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _rng_restore(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def train_step(
    wrapped: nn.Module, objective: Objective, runtime: Runtime, batch: dict[str, Any], accumulate: int
) -> dict[str, torch.Tensor]:
    """Forward, loss and backward of one optimizer step (gradients accumulate in ``.grad``); returns the terms.

    With ``accumulate > 1`` and an objective whose loss couples the batch (``coupled_keys``), the step is exact: the
    coupled outputs of every micro-batch are computed first without gradient (RNG states recorded, so dropout
    replays identically), then each micro-batch runs again with its own outputs live and the others' cached, and
    0-d outputs (the logit scale) keep their gradient only once. Otherwise the micro-batch losses are averaged.
    """
    if accumulate == 1:
        with runtime.autocast():
            terms = objective(wrapped(batch), batch)
        runtime.backward(terms["loss"])
        return terms
    micro = _micro_batches(batch, accumulate)
    no_sync = getattr(wrapped, "no_sync", None)
    coupled = objective.coupled_keys
    cached: list[dict[str, torch.Tensor]] = []
    states = []
    if coupled:
        with torch.no_grad(), runtime.autocast():
            for mb in micro:
                states.append(_rng_snapshot(runtime.device))
                out = wrapped(mb)
                cached.append({k: out[k] for k in coupled})
        after = _rng_snapshot(runtime.device)
    totals: dict[str, torch.Tensor] = {}
    for j, mb in enumerate(micro):
        sync = contextlib.nullcontext() if no_sync is None or j == accumulate - 1 else no_sync()
        with sync:
            if coupled:
                _rng_restore(states[j], runtime.device)
            with runtime.autocast():
                out = wrapped(mb)
                if coupled:
                    full = {k: (v.detach() if j > 0 and torch.is_tensor(v) and v.ndim == 0 else v) for k, v in out.items()}
                    for key in coupled:  # (B, ...) = cached rows, with micro-batch j's own rows live
                        full[key] = torch.cat([out[key] if i == j else cached[i][key] for i in range(accumulate)])
                    terms = objective(full, batch)
                else:
                    terms = objective(out, mb)
            runtime.backward(terms["loss"] if coupled else terms["loss"] / accumulate)
        for name, value in terms.items():
            value = value.detach()
            totals[name] = value if coupled else totals.get(name, 0) + value / accumulate
    if coupled:
        _rng_restore(after, runtime.device)
    return totals


@torch.no_grad()
def _model_metrics(model: nn.Module) -> dict[str, float]:
    scale = float(model.scale()) if hasattr(model, "scale") else float("nan")
    metrics = {"temperature": 1.0 / scale, "logit_scale": scale}
    if hasattr(model, "logit_bias"):
        metrics["logit_bias"] = float(model.logit_bias)
    return metrics


def train_stage(
    model_cfg: ModelConfig,
    stage: StageConfig,
    data: pd.DataFrame | TrainData | Any,
    init: dict[str, Any] | None,
    store: CheckpointStore,
    callbacks: Sequence[TrainCallback] = (),
    dist: DistContext | None = None,
) -> dict[str, Any]:
    """Train one stage and return its final checkpoint (written once, by rank 0, to ``store.final_path``).

    - ``data``: a manifest (its ``split == "train"`` rows, cached in RAM), a shard index (streamed), or a TrainData.
    - Starts from ``init``'s model weights when given (a previous stage's checkpoint; fresh optimizer), else from
      the towers' local pretrained weights or random init (seeded by ``stage.seed``).
    - Trains the parameters whose names start with ``stage.trainable`` (never those marked never-trainable).
    - Resumes exactly from ``store.latest()`` when it is an unfinished checkpoint of this stage with the same
      configs, training data and initial weights; returns it unchanged when it is a completed one.
    """
    dist = dist or current()
    if stage.batch_size % (dist.world_size * stage.accumulate):
        raise ConfigError(
            f"stage {stage.name!r}: batch_size={stage.batch_size} must be divisible by world_size x accumulate = "
            f"{dist.world_size} x {stage.accumulate}; it is the global batch of one optimizer step."
        )
    runtime = Runtime.create(stage.device, stage.precision, dist, stage.tf32, stage.pin_memory)
    if not reproducibility.in_force(stage.reproducibility, stage.cpu_threads):
        log.warning("stage %r asks for reproducibility=%s but this process was started in %s: its numerics record "
                    "says what really ran (vlalign train and kedro run start stages in the right mode).", stage.name,
                    stage.reproducibility, reproducibility.current_mode() or "native")
    reproducibility.apply_runtime(stage.reproducibility, runtime.device.type, stage.cpu_threads)
    numerics = reproducibility.describe(runtime.device)
    source = build_train_data(data, model_cfg, stage, dist, runtime)
    plan = {"world_size": dist.world_size, "num_workers": stage.num_workers} if isinstance(source, ShardData) else {}
    inputs = {"data_sha256": source.fingerprint(), "init_weights_sha256": weights_fingerprint(init), "plan": plan}
    if dist.is_main:
        stale = store.remove_stale_temporaries()
        if stale:
            log.warning("%s: removed %d temporary file(s) a killed run left: %s", store.directory, len(stale),
                        ", ".join(p.name for p in stale))
    resume = _stored_run(store, model_cfg, stage, inputs)
    if resume is not None and resume["completed"]:
        return resume
    torch.manual_seed(stage.seed)
    np.random.seed(stage.seed)
    random.seed(stage.seed)
    model = build_model(model_cfg, load_pretrained=resume is None and init is None)
    if resume is not None:
        _load_weights(model, resume["model"], str(store.latest()))
    elif init is not None:
        check_checkpoint(init, "init checkpoint")
        _load_weights(model, init["model"], f"init checkpoint of stage {init['stage_config'].get('name')!r}")
    # the weights this stage started from, for merging (vlalign.merge.checks): the init checkpoint's, else the fresh
    # weights before the first step (kept from the checkpoint on resume)
    start_sha = inputs["init_weights_sha256"] or (resume.get("start_weights_sha256") if resume is not None
                                                  else weights_fingerprint({"model": model.state_dict()}))
    trainable = set_trainable(model, stage.trainable)
    if stage.grad_checkpointing:
        model.set_grad_checkpointing(True)

    epoch_steps: dict[int, int] = {}

    def steps_in(epoch: int) -> int:
        if epoch not in epoch_steps:
            epoch_steps[epoch] = source.steps_in_epoch(epoch)
            if epoch_steps[epoch] == 0:
                raise ConfigError(f"stage {stage.name!r}: epoch {epoch} has no complete batch of {stage.batch_size}; "
                                  "lower batch_size or write more, smaller shards.")
        return epoch_steps[epoch]

    total_steps = stage.max_steps or sum(steps_in(e) for e in range(stage.epochs))
    context = ObjectiveContext(dist=dist, model=model, total_steps=total_steps, steps_per_epoch=steps_in(0))
    objective = build_objective(stage.objective, stage.objective_options, context)
    optimizer = build_optimizer(model, stage.lr, stage.weight_decay)
    scheduler = build_scheduler(optimizer, stage.warmup_steps, total_steps, stage.min_lr_ratio)
    step, epoch, position, history = 0, 0, 0, []
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        objective.load_state_dict(resume.get("objective") or {})
        if runtime.scaler is not None and resume.get("scaler"):
            runtime.scaler.load_state_dict(resume["scaler"])
        step, history = int(resume["step"]), list(resume["history"])
        epoch, position = int(resume["stream"]["epoch"]), int(resume["stream"]["batch"])
        set_rng_state(resume["rng"])
    wrapped = runtime.wrap(model, stage.compile)
    objective.to(runtime.device)
    for state in optimizer.state.values():  # a resumed optimizer's moments follow the parameters' device
        for key, value in state.items():
            if torch.is_tensor(value) and value.ndim > 0:
                state[key] = value.to(runtime.device)
    if dist.is_main:
        log.info("stage %r: %s on %s (%s, world %d), %d trainable tensors, %s, %d steps", stage.name,
                 stage.objective, runtime.device, stage.precision, dist.world_size, len(trainable),
                 source.describe(), total_steps)

    def checkpoint(completed: bool) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model_config": model_cfg.to_dict(),
            "stage_config": stage.to_dict(),
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": runtime.scaler.state_dict() if runtime.scaler is not None else None,
            "objective": {k: v.detach().cpu() for k, v in objective.state_dict().items()},
            "step": step,
            "epoch": epoch,
            "stream": {"epoch": epoch, "batch": position},
            "total_steps": total_steps,
            "rng": rng_state(),
            "completed": completed,
            "history": list(history),
            "inputs": inputs,
            "start_weights_sha256": start_sha,
            "data": source.describe(),
            "world_size": dist.world_size,
            "numerics": numerics,  # what decided these bits (vlalign.reproducibility.describe)
        }

    def save(completed: bool) -> dict[str, Any]:
        ckpt = checkpoint(completed)
        if dist.is_main:
            path = store.save(ckpt, "final" if completed else f"step-{step:08d}")
            for callback in callbacks:
                callback.on_checkpoint(path, step)
        dist.barrier()
        return ckpt

    model.train()
    for child in model.children():
        if not any(p.requires_grad for p in child.parameters()):
            child.eval()  # a frozen tower keeps its dropout off and its batch-norm statistics fixed
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=total_steps, initial=step, desc=f"train {stage.name}", unit="step", dynamic_ncols=True,
               disable=not dist.is_main)
    try:
        while step < total_steps:
            if position >= steps_in(epoch):
                epoch, position = epoch + 1, 0
                continue
            for batch in source.batches(epoch, position):
                batch = runtime.to_device(batch)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.zero_grad(set_to_none=True)
                terms = train_step(wrapped, objective, runtime, batch, stage.accumulate)
                runtime.step(optimizer, params, stage.grad_clip)
                apply_parameter_constraints(model)  # bounded parameters back in range, before any EMA copy reads them
                scheduler.step()
                step, position = step + 1, position + 1
                objective.after_step(model, step)
                bar.update(1)
                if step % stage.log_every == 0 or step == total_steps:
                    values = all_reduce_mean({k: float(v.detach()) for k, v in terms.items()}, dist, runtime.device)
                    if not math.isfinite(values["loss"]):
                        raise FloatingPointError(
                            f"stage {stage.name!r}: the loss became {values['loss']} at step {step}; lower lr "
                            f"(now {stage.lr}) or set grad_clip."
                        )
                    metrics = {**values, "lr": lr, **_model_metrics(model)}
                    bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k not in ("logit_scale",)},
                                    refresh=False)
                    history.append({"step": step, "epoch": epoch, **metrics})
                    if dist.is_main:
                        for callback in callbacks:
                            callback.on_step(step, metrics)
                if step == total_steps:
                    break
                if stage.checkpoint_every and step % stage.checkpoint_every == 0:
                    save(completed=False)
    finally:
        bar.close()
    return save(completed=True)
