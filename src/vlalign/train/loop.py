"""One training stage: contrastive training of a subset of the parameters, resumable step by step."""

from __future__ import annotations

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
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vlalign.data.datasets import ImageTextDataset, collate_pairs
from vlalign.data.transforms import build_transform
from vlalign.errors import CheckpointError, ConfigError, DatasetFormatError
from vlalign.losses.contrastive import ClipLoss
from vlalign.models.clip import CLIPModel, build_model
from vlalign.models.config import ModelConfig
from vlalign.models.towers import build_tokenizer_for
from vlalign.train.checkpoint import FORMAT, CheckpointStore, check_checkpoint, load_checkpoint, rng_state, set_rng_state
from vlalign.train.config import StageConfig
from vlalign.train.optim import build_optimizer, build_scheduler, set_trainable

log = logging.getLogger(__name__)

#: Stage fields that do not change the trained weights; a checkpoint still resumes when only they differ.
RESUME_INSENSITIVE = ("num_workers", "log_every", "checkpoint_every")


class TrainCallback(Protocol):
    """Receives training progress; e.g. an experiment tracker."""

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        """Every ``log_every`` steps (and at the last step): ``loss``, ``lr``, ``temperature``, ``logit_scale``."""

    def on_checkpoint(self, path: Path, step: int) -> None:
        """After a checkpoint was written to ``path`` at ``step``."""


def training_inputs_fingerprint(train_rows: pd.DataFrame, init: dict[str, Any] | None) -> dict[str, str | None]:
    """sha256 of the training rows and of the initial weights: what a stage's result depends on besides configs."""
    rows = train_rows[["image_id", "image_path", "caption", "lang"]].reset_index(drop=True)
    data = hashlib.sha256(pd.util.hash_pandas_object(rows, index=False).to_numpy().tobytes()).hexdigest()
    init_sha = None
    if init is not None:
        digest = hashlib.sha256()
        for name, tensor in sorted(init["model"].items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        init_sha = digest.hexdigest()
    return {"train_rows_sha256": data, "init_weights_sha256": init_sha}


def _stored_run(
    store: CheckpointStore, model_cfg: ModelConfig, stage: StageConfig, inputs: dict[str, str | None]
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
    saved = {k: v for k, v in ckpt["stage_config"].items() if k not in RESUME_INSENSITIVE}
    current = {k: v for k, v in stage.to_dict().items() if k not in RESUME_INSENSITIVE}
    if saved != current or ckpt["model_config"] != model_cfg.to_dict() or ckpt.get("inputs") != inputs:
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


def _load_weights(model: CLIPModel, state: dict[str, torch.Tensor], where: str) -> None:
    """Strictly load ``state`` into ``model``, naming ``where`` the weights came from on a mismatch."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{where}: its weights do not fit model {model.config.name!r}: {exc}") from exc


def _epoch_batches(n_items: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's shuffled batches of indices (a function of seed and epoch only); the remainder is dropped."""
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
    order = torch.randperm(n_items, generator=generator)  # (n_items,)
    n_batches = n_items // batch_size
    return order[: n_batches * batch_size].view(n_batches, batch_size).tolist()


def train_stage(
    model_cfg: ModelConfig,
    stage: StageConfig,
    manifest: pd.DataFrame,
    init: dict[str, Any] | None,
    store: CheckpointStore,
    callbacks: Sequence[TrainCallback] = (),
) -> dict[str, Any]:
    """Train one stage on the ``split == "train"`` rows of ``manifest`` and return its final checkpoint.

    - Starts from ``init``'s model weights when given (a previous stage's checkpoint; fresh optimizer),
      else from the towers' local pretrained weights or random init (seeded by ``stage.seed``).
    - Trains the parameters whose names start with ``stage.trainable``; fully frozen towers run in eval mode.
    - Resumes exactly from ``store.latest()`` when it is an unfinished checkpoint of this stage with the
      same configs, training rows and initial weights; returns it unchanged when it is a completed one.
    - Saves a checkpoint every ``stage.checkpoint_every`` steps and a ``completed=True`` one at the end.
    """
    train_rows = manifest[manifest["split"] == "train"]
    if train_rows.empty:
        raise DatasetFormatError(f"the manifest has no split == 'train' rows (splits: {sorted(manifest['split'].unique())}).")
    inputs = training_inputs_fingerprint(train_rows, init)
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
    trainable = set_trainable(model, stage.trainable)

    dataset = ImageTextDataset(
        train_rows,
        build_transform(model_cfg, train=True),
        build_tokenizer_for(model_cfg),
        model_cfg.text.context_length,
        stage.caption_langs,
        seed=stage.seed,
    )
    steps_per_epoch = len(dataset) // stage.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"stage {stage.name!r}: batch_size={stage.batch_size} exceeds the {len(dataset)} training images.")
    total_steps = stage.max_steps or stage.epochs * steps_per_epoch
    optimizer = build_optimizer(model, stage.lr, stage.weight_decay)
    scheduler = build_scheduler(optimizer, stage.warmup_steps, total_steps, stage.min_lr_ratio)
    step, history = 0, []
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        step, history = int(resume["step"]), list(resume["history"])
        set_rng_state(resume["rng"])
    log.info(
        "stage %r: %d trainable tensors, %d images, %d steps/epoch, %d steps",
        stage.name, len(trainable), len(dataset), steps_per_epoch, total_steps,
    )

    def checkpoint(completed: bool) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model_config": model_cfg.to_dict(),
            "stage_config": stage.to_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "epoch": step // steps_per_epoch,
            "total_steps": total_steps,
            "rng": rng_state(),
            "completed": completed,
            "history": list(history),
            "inputs": inputs,
        }

    def save(completed: bool) -> dict[str, Any]:
        ckpt = checkpoint(completed)
        path = store.save(ckpt, "final" if completed else f"step-{step:08d}")
        for callback in callbacks:
            callback.on_checkpoint(path, step)
        return ckpt

    loss_fn = ClipLoss()
    model.train()
    for child in model.children():
        if not any(p.requires_grad for p in child.parameters()):
            child.eval()  # a frozen tower keeps its dropout off and its batch-norm statistics fixed
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    loader_generator = torch.Generator()  # keeps the DataLoader from drawing on the global RNG
    bar = tqdm(total=total_steps, initial=step, desc=f"train {stage.name}", unit="step", dynamic_ncols=True)
    try:
        while step < total_steps:
            epoch, done_in_epoch = divmod(step, steps_per_epoch)
            dataset.set_epoch(epoch)
            batches = _epoch_batches(len(dataset), stage.batch_size, stage.seed, epoch)[done_in_epoch:]
            loader = DataLoader(
                dataset,
                batch_sampler=batches,
                collate_fn=collate_pairs,
                num_workers=stage.num_workers,
                generator=loader_generator,
            )
            for batch in loader:
                lr = optimizer.param_groups[0]["lr"]
                outputs = model(batch["pixels"], batch["input_ids"], batch["attention_mask"])
                loss = loss_fn(outputs)["loss"]  # ()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if stage.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(trainable_params, stage.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                value, scale = loss.item(), outputs["logit_scale"].item()
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"stage {stage.name!r}: the loss became {value} at step {step}; lower lr (now {stage.lr}) "
                        "or set grad_clip."
                    )
                metrics = {"loss": value, "lr": lr, "temperature": 1.0 / scale, "logit_scale": scale}
                bar.update(1)
                bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.2e}", temp=f"{1.0 / scale:.4f}", refresh=False)
                if step % stage.log_every == 0 or step == total_steps:
                    history.append({"step": step, "epoch": epoch, **metrics})
                    for callback in callbacks:
                        callback.on_step(step, metrics)
                if step == total_steps:
                    break
                if stage.checkpoint_every and step % stage.checkpoint_every == 0:
                    save(completed=False)
    finally:
        bar.close()
    return save(completed=True)
