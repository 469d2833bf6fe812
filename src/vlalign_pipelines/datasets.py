"""Kedro datasets: the catalog owns every path, the library owns every format.

Each class is a thin adapter from a catalog entry to a ``vlalign`` function.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd
from kedro.io import AbstractDataset, DatasetError

from vlalign.data.demo import DemoConfig, generate_demo_dataset
from vlalign.data.formats import load_corpus, load_imagefolder, load_lines
from vlalign.train.checkpoint import CheckpointStore, load_checkpoint, save_checkpoint


def _ensure_demo(demo_root: str | None, demo_config: dict[str, Any] | None) -> None:
    """Generate the built-in default dataset under ``demo_root`` when it is absent (seeded, offline)."""
    if demo_root:
        generate_demo_dataset(Path(demo_root), DemoConfig(**(demo_config or {})))


class ImageCaptionCorpusDataset(AbstractDataset[None, pd.DataFrame]):
    """An image-caption corpus in Karpathy JSON format, loaded as the manifest table.

    Catalog example::

        raw_manifest:
          type: vlalign_pipelines.datasets.ImageCaptionCorpusDataset
          sources:
            - {json: data/01_raw/flickr30k/dataset_flickr30k.json, image_root: data/01_raw/flickr30k/images, lang: en}
          demo_root: null      # set to generate the built-in dataset there when it is absent

    The manifest has one row per image-caption pair (see ``vlalign.data.formats``). It is read-only.
    """

    def __init__(
        self,
        sources: list[dict[str, str]],
        demo_root: str | None = None,
        demo_config: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._sources = [dict(s) for s in sources]
        self._demo_root = demo_root
        self._demo_config = demo_config
        self.metadata = metadata

    def load(self) -> pd.DataFrame:
        _ensure_demo(self._demo_root, self._demo_config)
        return load_corpus(self._sources)

    def save(self, data: pd.DataFrame) -> None:
        raise DatasetError("ImageCaptionCorpusDataset is read-only: raw corpora are never overwritten.")

    def _exists(self) -> bool:
        return all(Path(s["json"]).exists() for s in self._sources)

    def _describe(self) -> dict[str, Any]:
        return {"sources": self._sources, "demo_root": self._demo_root}


class ZeroShotSetDataset(AbstractDataset[None, dict[str, Any]]):
    """A classification set in the ImageNet folder layout, with class names and prompt templates.

    ``load`` returns ``{"images": DataFrame[image_path, label, wnid], "wnids": [...],
    "classnames": {lang: [...]}, "templates": {lang: [...]}}``.
    """

    def __init__(
        self,
        root: str,
        classnames: dict[str, str],
        templates: dict[str, str],
        split_dir: str = "val",
        demo_root: str | None = None,
        demo_config: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._root = Path(root)
        self._split_dir = split_dir
        self._classnames = dict(classnames)
        self._templates = dict(templates)
        self._demo_root = demo_root
        self._demo_config = demo_config
        self.metadata = metadata

    def _resolve(self, name: str) -> Path:
        path = Path(name)
        return path if path.is_absolute() else self._root / path

    def load(self) -> dict[str, Any]:
        _ensure_demo(self._demo_root, self._demo_config)
        images, wnids = load_imagefolder(self._root / self._split_dir)
        return {
            "images": images,
            "wnids": wnids,
            "classnames": {lang: load_lines(self._resolve(f)) for lang, f in self._classnames.items()},
            "templates": {lang: load_lines(self._resolve(f)) for lang, f in self._templates.items()},
        }

    def save(self, data: dict[str, Any]) -> None:
        raise DatasetError("ZeroShotSetDataset is read-only.")

    def _exists(self) -> bool:
        return (self._root / self._split_dir).is_dir()

    def _describe(self) -> dict[str, Any]:
        return {"root": str(self._root), "split_dir": self._split_dir}


class TorchCheckpointDataset(AbstractDataset[dict[str, Any], dict[str, Any]]):
    """A self-describing vlalign checkpoint file (written atomically, loaded with weights_only=True)."""

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = PurePosixPath(filepath)
        self.metadata = metadata

    def load(self) -> dict[str, Any]:
        return load_checkpoint(Path(self._filepath))

    def save(self, data: dict[str, Any]) -> None:
        save_checkpoint(data, Path(self._filepath))

    def _exists(self) -> bool:
        return Path(self._filepath).exists()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}


class CheckpointStoreDataset(AbstractDataset[None, CheckpointStore]):
    """The folder where a training stage keeps its resumable checkpoints.

    Loading it hands the training node a ``CheckpointStore``; the library writes into it during training.
    """

    def __init__(self, path: str, metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(path)
        self.metadata = metadata

    def load(self) -> CheckpointStore:
        return CheckpointStore(self._path)

    def save(self, data: Any) -> None:
        raise DatasetError("CheckpointStoreDataset is written by the training loop, not by Kedro.")

    def _exists(self) -> bool:
        return True

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}
