"""Kedro datasets: the catalog owns every path, the library owns every format.

Each class is a thin adapter from a catalog entry to a ``vlalign`` function.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd
from kedro.io import AbstractDataset, DatasetError

from vlalign.data.demo import DemoConfig, generate_demo_dataset
from vlalign.data.classnames import imagenet_classnames, imagenet_templates
from vlalign.data.formats import load_coco_cn, load_corpus, load_imagefolder, load_imagenet_flat, load_lines
from vlalign.train.checkpoint import CheckpointRef, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


def _ensure_demo(demo_root: str | None, demo_config: dict[str, Any] | None) -> None:
    """Generate the built-in default dataset under ``demo_root`` when it is absent (seeded, offline)."""
    if demo_root:
        generate_demo_dataset(Path(demo_root), DemoConfig.from_mapping(demo_config, "globals demo_config"))


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


#: Value of a ``classnames`` / ``templates`` entry meaning "the ImageNet-1k lists shipped in open-clip-torch
#: (en) / cn-clip (zh)" instead of a file.
PACKAGE_IMAGENET = "package:imagenet"


class ZeroShotSetDataset(AbstractDataset[None, dict[str, Any]]):
    """A classification set in the ImageNet folder layout, with class names and prompt templates.

    ``load`` returns ``{"images": DataFrame[image_path, label, wnid], "wnids": [...],
    "classnames": {lang: [...]}, "templates": {lang: [...]}}``.

    ``layout: folder`` (default) reads ``root/split_dir/<wnid>/<image>``. ``layout: flat`` reads every image
    of ``root/split_dir`` with ``labels_file`` (one label per line in file-name order, or a
    ``filename,label`` CSV); ``label_index_base: 1`` and ``label_wnids_file`` handle the devkit's
    ``ILSVRC2012_validation_ground_truth.txt`` (see ``vlalign.data.formats.load_imagenet_flat``).
    A ``classnames``/``templates`` value ``package:imagenet`` takes the 1,000 ImageNet class names / 80 CLIP
    templates from open-clip-torch (en) or cn-clip (zh). Relative file names are resolved against ``root``.
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
        layout: str = "folder",
        labels_file: str | None = None,
        label_index_base: int = 0,
        label_wnids_file: str | None = None,
        wnids_file: str | None = None,
        extra_image_roots: list[str] | None = None,
    ) -> None:
        if layout not in ("folder", "flat"):
            raise DatasetError(f"ZeroShotSetDataset: layout={layout!r}; expected 'folder' or 'flat'.")
        if layout == "flat" and not labels_file:
            raise DatasetError("ZeroShotSetDataset: layout 'flat' needs labels_file (one label per image).")
        self._root = Path(root)
        self._split_dir = split_dir
        self._layout = layout
        self._labels_file = labels_file
        self._label_index_base = label_index_base
        self._label_wnids_file = label_wnids_file
        self._wnids_file = wnids_file
        self._extra_image_roots = list(extra_image_roots or [])
        self._classnames = dict(classnames)
        self._templates = dict(templates)
        self._demo_root = demo_root
        self._demo_config = demo_config
        self.metadata = metadata

    def _resolve(self, name: str) -> Path:
        path = Path(name)
        return path if path.is_absolute() else self._root / path

    def _images(self) -> tuple[pd.DataFrame, list[str]]:
        image_dir = self._root / self._split_dir
        wnids_file = self._resolve(self._wnids_file) if self._wnids_file else None
        if self._layout == "folder":
            return load_imagefolder(image_dir, wnids_file, self._extra_image_roots)
        label_wnids = self._resolve(self._label_wnids_file) if self._label_wnids_file else None
        images = load_imagenet_flat(image_dir, self._resolve(self._labels_file), self._label_index_base,
                                    label_wnids, wnids_file, self._extra_image_roots)
        if wnids_file is not None:
            wnids = load_lines(wnids_file)
        else:
            wnids = sorted(load_lines(label_wnids)) if label_wnids is not None else []
        return images, wnids

    def _lines(self, spec: str, lang: str, kind: str) -> list[str]:
        if spec == PACKAGE_IMAGENET:
            return imagenet_classnames(lang) if kind == "classnames" else imagenet_templates(lang)
        return load_lines(self._resolve(spec))

    def load(self) -> dict[str, Any]:
        _ensure_demo(self._demo_root, self._demo_config)
        images, wnids = self._images()
        return {
            "images": images,
            "wnids": wnids,
            "classnames": {lang: self._lines(f, lang, "classnames") for lang, f in self._classnames.items()},
            "templates": {lang: self._lines(f, lang, "templates") for lang, f in self._templates.items()},
        }

    def save(self, data: dict[str, Any]) -> None:
        raise DatasetError("ZeroShotSetDataset is read-only.")

    def _exists(self) -> bool:
        return (self._root / self._split_dir).is_dir()

    def _describe(self) -> dict[str, Any]:
        return {"root": str(self._root), "split_dir": self._split_dir, "layout": self._layout}


class CocoCnDataset(AbstractDataset[None, pd.DataFrame]):
    """The COCO-CN release (split lists + human-written Chinese captions) as a manifest table (lang zh).

    Catalog example::

        raw_manifest:
          type: vlalign_pipelines.datasets.CocoCnDataset
          root: data/01_raw/coco_cn                 # coco-cn_{train,val,test}.txt, imageid.human-written-caption.txt
          image_roots: data/01_raw/coco_cn/images   # holds train2014/ and val2014/ (or {train2014: .., val2014: ..})
          splits: [train, val, test]

    See ``vlalign.data.formats.load_coco_cn`` for the exact format. It is read-only.
    """

    def __init__(
        self,
        root: str,
        image_roots: str | dict[str, str],
        splits: list[str] | None = None,
        captions_file: str = "imageid.human-written-caption.txt",
        split_files: dict[str, str] | None = None,
        id_prefix: str = "",
        extra_image_roots: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._root = root
        self._extra_image_roots = list(extra_image_roots or [])
        self._image_roots = dict(image_roots) if isinstance(image_roots, dict) else image_roots
        self._splits = list(splits or ["train", "val", "test"])
        self._captions_file = captions_file
        self._split_files = split_files
        self._id_prefix = id_prefix
        self.metadata = metadata

    def load(self) -> pd.DataFrame:
        return load_coco_cn(self._root, self._image_roots, self._splits, self._captions_file,
                            self._split_files, self._id_prefix, self._extra_image_roots)

    def save(self, data: pd.DataFrame) -> None:
        raise DatasetError("CocoCnDataset is read-only: raw corpora are never overwritten.")

    def _exists(self) -> bool:
        return (Path(self._root) / self._captions_file).exists()

    def _describe(self) -> dict[str, Any]:
        return {"root": self._root, "image_roots": self._image_roots, "splits": self._splits}


class CheckpointFileDataset(AbstractDataset[Any, CheckpointRef]):
    """A self-describing vlalign checkpoint file, handed on as a :class:`~vlalign.train.checkpoint.CheckpointRef`.

    Saving a checkpoint dict writes it atomically; saving a ``CheckpointRef`` to this very file (what a training
    stage returns: the library wrote ``final.pt`` once) writes nothing, and a ref to another file is copied
    atomically (e.g. a stage trained elsewhere). Loading returns a ref; nodes call ``.load()`` (weights_only=True).
    """

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self) -> CheckpointRef:
        if not self._filepath.is_file():
            raise DatasetError(f"{self._filepath}: checkpoint not found; run the stage that writes it first.")
        return CheckpointRef(str(self._filepath))

    def save(self, data: dict[str, Any] | CheckpointRef) -> None:
        if isinstance(data, CheckpointRef):
            if self._filepath.exists() and os.path.samefile(data.path, self._filepath):
                return
            save_checkpoint(load_checkpoint(data.path), self._filepath)
            return
        save_checkpoint(data, self._filepath)

    def _exists(self) -> bool:
        return self._filepath.exists()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}


class StageDirDataset(AbstractDataset[None, str]):
    """The folder of one training stage (spec.json, checkpoints/, final.pt); loading gives its path, which the
    training node puts into the stage's TrainSpec. The library writes into it; Kedro never saves it."""

    def __init__(self, path: str, metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(path)
        self.metadata = metadata

    def load(self) -> str:
        return str(self._path)

    def save(self, data: Any) -> None:
        raise DatasetError("StageDirDataset is written by `vlalign train`, not by Kedro.")

    def _exists(self) -> bool:
        return True

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}


class ShardIndexDataset(AbstractDataset[pd.DataFrame, Any]):
    """WebDataset-style tar shards of the training rows (``vlalign.data.shards``): saving a manifest writes (or
    reuses, when unchanged) content-addressed shards and ``shards.json`` under ``path``; loading gives the index.

    ``path`` may be a local folder or an fsspec URL for loading (shared by several nodes); writing is local.
    """

    def __init__(self, path: str, max_samples: int = 1000, max_mib: int = 256, seed: int = 0,
                 metadata: dict[str, Any] | None = None) -> None:
        self._path = path
        self._max_samples, self._max_mib, self._seed = max_samples, max_mib, seed
        self.metadata = metadata

    def load(self) -> Any:
        from vlalign.data.shards import ShardIndex

        return ShardIndex.load(self._path)

    def save(self, data: pd.DataFrame | list) -> None:
        """A manifest is written as shards; a list of ``(ShardIndex, weight)`` as their mixture."""
        from vlalign.data.shards import mix_shards, write_shards

        if isinstance(data, list):
            mix_shards(data, self._path, max_samples=self._max_samples, max_bytes=self._max_mib << 20)
            return
        write_shards(data, self._path, split="train", max_samples=self._max_samples, max_bytes=self._max_mib << 20,
                     seed=self._seed)

    def _exists(self) -> bool:
        return (Path(self._path) / "shards.json").exists()

    def _describe(self) -> dict[str, Any]:
        return {"path": self._path, "max_samples": self._max_samples, "max_mib": self._max_mib}


class OptionalJSONDataset(AbstractDataset[None, dict[str, Any]]):
    """A read-only JSON file that loads as ``{}`` (with a warning) when it does not exist.

    Used for ``probe_source``: the per-image attributes of the built-in dataset, which the
    compositional probe needs. In an environment without that file (real datasets) the probe is
    skipped instead of failing the evaluation. A file that exists but is not valid JSON still fails.
    """

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self) -> dict[str, Any]:
        if not self._filepath.is_file():
            log.warning("%s does not exist; loading it as {} (the step that needs it is skipped).", self._filepath)
            return {}
        try:
            return json.loads(self._filepath.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{self._filepath}: not valid JSON ({exc}).") from exc

    def save(self, data: dict[str, Any]) -> None:
        raise DatasetError("OptionalJSONDataset is read-only.")

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}
