"""Self-describing checkpoints: atomic save, weights_only load, a per-stage store, RNG state capture."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlalign.errors import CheckpointError
from vlalign.models.clip import CLIPModel, build_model
from vlalign.models.config import ModelConfig

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


def model_from_checkpoint(ckpt: dict[str, Any]) -> CLIPModel:
    """Rebuild the model of a checkpoint from its own config and weights, in eval mode."""
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
    return {
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


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states captured by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


class CheckpointStore:
    """A folder of one stage's checkpoints: ``step-<n>.pt`` while training, ``final.pt`` at the end.

    ``LATEST`` names the most recently saved file, so :meth:`latest` never guesses from timestamps.
    Only the ``keep_last`` most recent step checkpoints are kept.
    """

    def __init__(self, directory: str | Path, keep_last: int = 2) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last

    @property
    def final_path(self) -> Path:
        """Where the completed stage's checkpoint is written."""
        return self.directory / "final.pt"

    def latest(self) -> Path | None:
        """The most recently saved checkpoint, or None when the store holds none."""
        pointer = self.directory / "LATEST"
        if not pointer.is_file():
            return None
        path = self.directory / pointer.read_text(encoding="utf-8").strip()
        return path if path.is_file() else None

    def save(self, ckpt: dict[str, Any], name: str) -> Path:
        """Atomically write ``<name>.pt``, point ``LATEST`` at it, and prune old step checkpoints."""
        path = save_checkpoint(ckpt, self.directory / f"{name}.pt")
        fd, tmp = tempfile.mkstemp(prefix=".LATEST.", dir=self.directory)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(path.name)
        os.replace(tmp, self.directory / "LATEST")
        steps = sorted(self.directory.glob("step-*.pt"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
        for old in steps[self.keep_last :]:
            if old != path:
                old.unlink(missing_ok=True)
        return path
