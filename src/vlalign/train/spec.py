"""The one input of ``vlalign train``: everything a training stage needs, as one JSON file.

The Kedro training node, ``torchrun -m vlalign train --spec FILE`` and a Kubernetes pod all run a stage from
a :class:`TrainSpec`; only where the file's paths point differs (a local folder, a shared volume, or an
fsspec URL such as ``s3://bucket/run``).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from vlalign.errors import ConfigError

SPEC_FORMAT = "vlalign-train-spec-v1"


@dataclass
class TrainSpec:
    """One training stage, fully resolved: configs, inputs and where to write."""

    model: dict[str, Any]  # ModelConfig.to_dict() of the model to build (arch, towers, embed dim, ...)
    stage: dict[str, Any]  # StageConfig.to_dict() of the stage (objective, optimizer, schedule, device, ...)
    data: str  # training data: a clean manifest (.parquet) or a shard index (shards.json, or its folder)
    out_dir: str  # the stage folder: checkpoints/ (resumable), final.pt (written once), spec.json
    init: str | None = None  # initial weights: a checkpoint file (the previous stage's final.pt); None = fresh
    image_roots: list[str] = field(default_factory=list)  # extra folders images may be read from (containment)
    mlflow: dict[str, Any] | None = None  # {"tracking_uri", "experiment_id", "parent_run_id"}; None = no tracking
    format: str = SPEC_FORMAT  # file format marker

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "train spec") -> TrainSpec:
        """Build from a dict, naming ``where`` and the field on a missing or unknown field."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a JSON object with the TrainSpec fields, got {type(data).__name__}.")
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - allowed)
        missing = sorted(k for k in ("model", "stage", "data", "out_dir") if k not in data)
        if unknown or missing:
            raise ConfigError(
                f"{where}: unknown field(s) {unknown} / missing field(s) {missing}; a train spec has the fields "
                f"{sorted(allowed)} (see vlalign.train.spec.TrainSpec)."
            )
        if data.get("format", SPEC_FORMAT) != SPEC_FORMAT:
            raise ConfigError(f"{where}: format {data.get('format')!r}; expected {SPEC_FORMAT!r}.")
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        """Write the spec as JSON, atomically (temporary file + rename), first deleting the temporary files of this
        target that a killed process left."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*"):
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2, sort_keys=True)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TrainSpec:
        """Read a spec file written by :meth:`save` (or by hand)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: train spec file not found; write one with TrainSpec.save or `vlalign train --help`.")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: not a JSON train spec ({exc}).") from exc
        return cls.from_dict(data, where=str(path))
