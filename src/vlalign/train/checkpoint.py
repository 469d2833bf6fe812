"""Self-describing checkpoints: atomic save, weights_only load, a per-stage store, RNG state capture, and
:class:`CheckpointRef`, the handle by which stages hand their ``final.pt`` files on."""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlalign.errors import CheckpointError
from torch import nn

from vlalign.models.config import ModelConfig
from vlalign.models.registry import build_model

FORMAT = "vlalign-checkpoint-v1"
REQUIRED_KEYS = ("format", "model_config", "stage_config", "model", "step", "completed")


def save_checkpoint(ckpt: dict[str, Any], path: str | Path) -> Path:
    """Write ``ckpt`` to ``path`` atomically: a temporary file in the same folder, fsync, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(ckpt, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` and check it is a vlalign checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a corrupt or foreign file
        raise CheckpointError(f"{path}: cannot be loaded with torch.load(weights_only=True): {exc}") from exc
    check_checkpoint(ckpt, str(path))
    return ckpt


def check_checkpoint(ckpt: Any, where: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` unless ``ckpt`` is a dict in the ``vlalign-checkpoint-v1`` format."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{where}: not a {FORMAT} checkpoint (format={found!r}); was it written by vlalign.train?")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{where}: {FORMAT} checkpoint lacks key(s) {missing}; the file is incomplete.")


def model_from_checkpoint(ckpt: dict[str, Any] | CheckpointRef | str | Path) -> nn.Module:
    """Rebuild the model of a checkpoint (a dict, a :class:`CheckpointRef` or a path) from its own config and
    weights, in eval mode; the config's ``arch`` picks the builder."""
    ckpt = as_checkpoint(ckpt)
    check_checkpoint(ckpt)
    cfg = ModelConfig.from_dict(ckpt["model_config"])
    model = build_model(cfg, load_pretrained=False)
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint of model {cfg.name!r} does not fit the model its config builds ({exc}); "
            "the vocabulary or tower files it names may have changed since it was written."
        ) from exc
    return model.eval()


def rng_state() -> dict[str, Any]:
    """Torch, numpy and Python RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": keys.tolist(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "state": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states captured by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointStore:
    """The folder of one stage: ``checkpoints/step-<n>.pt`` while training, ``final.pt`` once at the end.

    ``checkpoints/LATEST`` names the most recently saved file (relative to the folder), so :meth:`latest` never
    guesses from timestamps. Only the ``keep_last`` most recent step checkpoints are kept.
    """

    def __init__(self, directory: str | Path, keep_last: int = 2) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last

    @property
    def final_path(self) -> Path:
        """Where the completed stage's checkpoint is written (once)."""
        return self.directory / "final.pt"

    @property
    def steps_dir(self) -> Path:
        """The folder of the resumable step checkpoints."""
        return self.directory / "checkpoints"

    def latest(self) -> Path | None:
        """The most recently saved checkpoint, or None when the store holds none."""
        pointer = self.steps_dir / "LATEST"
        if not pointer.is_file():
            return None
        path = self.directory / pointer.read_text(encoding="utf-8").strip()
        return path if path.is_file() else None

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporary files that a process killed while writing left in this store (the ``.final.pt.*.tmp``
        and ``.step-*.pt.*.tmp`` files of :func:`save_checkpoint`, the ``.LATEST.*`` files of :meth:`save`) and
        return them. Training calls it on start, before any write: a store has one writer at a time."""
        found = [*self.directory.glob(f".{self.final_path.name}.*.tmp"), *self.steps_dir.glob(".step-*.pt.*.tmp"),
                 *self.steps_dir.glob(".LATEST.*")]
        for path in found:
            path.unlink(missing_ok=True)
        return found

    def save(self, ckpt: dict[str, Any], name: str) -> Path:
        """Atomically write ``final.pt`` (``name == "final"``) or ``checkpoints/<name>.pt``, point ``LATEST`` at
        it, and prune old step checkpoints."""
        path = self.final_path if name == "final" else self.steps_dir / f"{name}.pt"
        save_checkpoint(ckpt, path)
        self.steps_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".LATEST.", dir=self.steps_dir)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(str(path.relative_to(self.directory)))
        os.replace(tmp, self.steps_dir / "LATEST")
        steps = sorted(self.steps_dir.glob("step-*.pt"), key=lambda p: p.name, reverse=True)
        for old in steps[self.keep_last :]:
            if old != path:
                old.unlink(missing_ok=True)
        return path


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint handed on as a file: what a stage returns and what merging, evaluation and registration read.

    Loading is explicit (:meth:`load`), so passing a stage's result along never copies or rewrites its weights.
    """

    path: str  # the checkpoint file (e.g. data/06_models/stage2/final.pt)

    def load(self) -> dict[str, Any]:
        """The checkpoint dict (``torch.load(weights_only=True)``)."""
        return load_checkpoint(self.path)

    def sha256(self) -> str:
        """sha256 of the file's bytes."""
        digest = hashlib.sha256()
        with open(self.path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
        return digest.hexdigest()


def as_checkpoint(value: dict[str, Any] | CheckpointRef | str | Path) -> dict[str, Any]:
    """A checkpoint dict from a dict (returned as is), a :class:`CheckpointRef` or a path."""
    if isinstance(value, dict):
        return value
    if isinstance(value, CheckpointRef):
        return value.load()
    return load_checkpoint(value)
