"""Lineage of a registered model: which code, data, parameters and checkpoints produced it.

The manifest is a plain dict, written as ``lineage.json`` beside the model and flattened into
model-version tags, so an auditor can go from a registry entry back to a git commit, the DVC-tracked
data and the exact rows used for training.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

TRACKED_PACKAGES = ("torch", "timm", "transformers", "kedro", "mlflow", "dvc", "great-expectations")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def frame_fingerprint(frame: pd.DataFrame) -> str:
    """A sha256 over a table's rows (order-sensitive), independent of how the table is stored."""
    hashed = pd.util.hash_pandas_object(frame.reset_index(drop=True), index=False).to_numpy()
    return hashlib.sha256(hashed.tobytes()).hexdigest()


def git_state(repo: str | Path = ".") -> dict[str, Any]:
    """The commit checked out in ``repo`` and whether the work tree has uncommitted changes."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def dvc_lock_state(repo: str | Path = ".") -> dict[str, Any]:
    """Hashes that ``dvc.lock`` records for each stage's outputs (empty when there is no dvc.lock)."""
    lock = Path(repo) / "dvc.lock"
    if not lock.exists():
        return {}
    import yaml

    data = yaml.safe_load(lock.read_text()) or {}
    outs: dict[str, Any] = {}
    for stage, body in (data.get("stages") or {}).items():
        for out in body.get("outs", []) or []:
            outs[out["path"]] = out.get("md5") or out.get("hash")
    return {"dvc_lock_sha256": sha256_file(lock), "outs": outs}


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str]:
    """Installed versions of the packages that shape a model."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def build_lineage(
    checkpoint_path: str | Path,
    manifest: pd.DataFrame,
    params: Mapping[str, Any],
    metrics: Mapping[str, Any],
    validation_report: Mapping[str, Any],
    run_id: str | None,
    repo: str | Path = ".",
) -> dict[str, Any]:
    """Everything needed to audit and reproduce a model, as one JSON-serialisable dict."""
    return {
        "git": git_state(repo),
        "dvc": dvc_lock_state(repo),
        "packages": package_versions(),
        "checkpoint_sha256": sha256_file(checkpoint_path),
        "training_data": {
            "manifest_sha256": frame_fingerprint(manifest),
            "rows": int(len(manifest)),
            "images": int(manifest["image_id"].nunique()),
            "splits": {k: int(v) for k, v in manifest["split"].value_counts().items()},
        },
        "validation": {k: validation_report.get(k) for k in ("n_rows", "n_clean", "rejected_fraction") if k in validation_report},
        "params": json.loads(json.dumps(params, default=str)),
        "metrics": json.loads(json.dumps(metrics, default=str)),
        "mlflow_run_id": run_id,
    }


def lineage_tags(lineage: Mapping[str, Any]) -> dict[str, str]:
    """The short, searchable part of the lineage as model-version tags."""
    tags = {
        "git_commit": str(lineage["git"].get("commit")),
        "git_dirty": str(lineage["git"].get("dirty")),
        "checkpoint_sha256": lineage["checkpoint_sha256"],
        "training_manifest_sha256": lineage["training_data"]["manifest_sha256"],
        "mlflow_run_id": str(lineage.get("mlflow_run_id")),
    }
    if lineage["dvc"]:
        tags["dvc_lock_sha256"] = lineage["dvc"]["dvc_lock_sha256"]
    return tags
