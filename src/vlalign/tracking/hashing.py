"""Content hashes: of files and folders exactly as DVC records them, of model weights, and of evaluation data.

- :func:`dvc_hash` gives the ``md5`` that ``dvc add`` / ``dvc.lock`` record for a path: the md5 of a file's
  bytes, or for a folder the md5 of DVC's JSON listing of its files (``<md5>.dir``). It calls dvc-data's
  own ``build`` (the code behind ``dvc add``), honours ``.dvcignore`` like DVC does, and keeps DVC's
  state cache (inode, mtime, size -> md5) so a folder that did not change is not read again.
- :func:`weights_sha256` hashes a state dict's tensors (names, dtypes, shapes, bytes), independent of how
  the checkpoint file was serialised: two runs that produce the same weights give the same hash.
- :func:`evaluation_data_identity` hashes exactly what an evaluation scored, by content: image file
  md5s, captions, labels, class names and templates, so two versions evaluated on different data are
  never compared with each other.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd

from vlalign.errors import ConfigError

#: Environment variable naming the folder of the hash state cache (default: ~/.cache/vlalign/dvc-state).
STATE_DIR_ENV = "VLALIGN_HASH_STATE_DIR"


def default_state_dir() -> Path:
    """Where hashes of unchanged files are remembered between runs (``$VLALIGN_HASH_STATE_DIR`` wins)."""
    if os.environ.get(STATE_DIR_ENV):
        return Path(os.environ[STATE_DIR_ENV])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "vlalign" / "dvc-state"


def _dvc_root(path: Path) -> Path | None:
    """The nearest folder at or above ``path`` that holds a ``.dvc`` folder (a DVC repository), or None."""
    for folder in (path, *path.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return None


@lru_cache(maxsize=8)
def _state(state_dir: str | None):
    from dvc_data.hashfile.state import State, StateNoop

    if state_dir is None:
        return StateNoop()
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    return State(os.sep, state_dir)


def _ignore_filter(path: Path):
    """DVC's ignore rules for ``path``: the default ones (.git, .hg, .dvc) and the repository's .dvcignore files."""
    from dvc.ignore import DvcIgnoreFilter
    from dvc_objects.fs.local import LocalFileSystem

    root = _dvc_root(path if path.is_dir() else path.parent) or (path if path.is_dir() else path.parent)
    return DvcIgnoreFilter(LocalFileSystem(), str(root))


def dvc_hash(path: str | Path, state_dir: str | Path | None | bool = True) -> dict[str, Any]:
    """The hash DVC records for ``path``: ``{"md5", "size", "nfiles", "isdir"}``.

    Args:
        path: a file or a folder.
        state_dir: folder of the hash cache; ``True`` (default) uses :func:`default_state_dir`,
            ``None``/``False`` hashes every file afresh.

    Returns:
        ``md5`` is what ``dvc add`` writes in the ``.dvc`` file (and ``dvc.lock`` for a stage output):
        the file's md5, or ``<md5>.dir`` for a folder; ``size`` in bytes; ``nfiles`` for a folder.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path).resolve()
    meta, obj = _build(path, state_dir)
    record = {"md5": obj.hash_info.value, "size": meta.size, "isdir": path.is_dir()}
    if path.is_dir():
        record["nfiles"] = meta.nfiles
    return record


def _build(path: Path, state_dir: str | Path | None | bool) -> tuple[Any, Any]:
    """dvc-data's ``build`` of ``path`` (dry run: nothing is copied): ``(meta, object)``; a folder's object is
    its ``Tree`` (the ``.dir`` listing)."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    if not path.exists():
        raise FileNotFoundError(f"{path}: cannot hash a path that does not exist.")
    if state_dir is True:
        state_dir = default_state_dir()
    state = _state(str(state_dir) if state_dir else None)
    fs = LocalFileSystem()
    odb = HashFileDB(fs, str(path.parent / ".vlalign-unused-odb"), state=state, hash_name="md5")
    _, meta, obj = build(odb, str(path), fs, "md5", dry_run=True, ignore=_ignore_filter(path) if path.is_dir() else None)
    return meta, obj


def dvc_listing(path: str | Path, state_dir: str | Path | None | bool = True) -> list[dict[str, str]] | None:
    """The file list DVC stores as a folder's ``.dir`` object: ``[{"md5", "relpath"}, ...]`` sorted by path
    (None for a file). Recorded with the lineage, so an audit can name the files that changed."""
    path = Path(path).resolve()
    if not path.is_dir():
        return None
    _, obj = _build(path, state_dir)
    return [{"md5": entry["md5"], "relpath": entry["relpath"]} for entry in obj.as_list()]


def listing_diff(recorded: Sequence[Mapping[str, str]], current: Sequence[Mapping[str, str]]) -> dict[str, list[str]]:
    """``{"changed", "added", "removed"}``: relative paths whose md5 differs, that are new, or that are gone."""
    old = {e["relpath"]: e["md5"] for e in recorded}
    new = {e["relpath"]: e["md5"] for e in current}
    return {
        "changed": sorted(p for p in old.keys() & new.keys() if old[p] != new[p]),
        "added": sorted(new.keys() - old.keys()),
        "removed": sorted(old.keys() - new.keys()),
    }


def dvc_hashes(
    paths: Mapping[str, str | Path], state_dir: str | Path | None | bool = True, where: str = "paths"
) -> dict[str, dict[str, Any]]:
    """:func:`dvc_hash` of each named path, as ``{name: {"path", "md5", "size", ...}}``.

    Raises:
        ConfigError: a path does not exist (named by ``where`` and its key, so the message points at
            the parameter to fix).
    """
    records = {}
    for name, path in paths.items():
        if path is None:
            continue
        if not Path(path).exists():
            raise ConfigError(
                f"{where}.{name}: {path} does not exist; point it at the file or folder the run used, "
                "or remove the entry."
            )
        records[name] = {"path": str(path), **dvc_hash(path, state_dir)}
    return records


def file_md5s(paths: Iterable[str | Path], state_dir: str | Path | None | bool = True) -> dict[str, str]:
    """md5 of each file's bytes (DVC's file hash), keyed by the path as given.

    Uses the same state cache as :func:`dvc_hash`, looked up and updated in one batch each (one database
    transaction, not one per file).
    """
    from dvc_data.hashfile.hash import hash_file
    from dvc_objects.fs.local import LocalFileSystem

    if state_dir is True:
        state_dir = default_state_dir()
    state = _state(str(state_dir) if state_dir else None)
    fs = LocalFileSystem()
    given = {os.path.abspath(p): p for p in dict.fromkeys(str(p) for p in paths)}
    infos = {path: fs.info(path) for path in given}
    out, fresh = {}, []
    for path, _, info in state.get_many(list(infos), fs, infos):
        if info is not None and info.name == "md5":
            out[given[path]] = info.value
        else:
            _, info = hash_file(path, fs, "md5", info=infos[path])
            out[given[path]] = info.value
            fresh.append((path, info, infos[path]))
    state.save_many(fresh, fs)
    return {p: out[p] for p in given.values()}


def weights_sha256(state_dict: Mapping[str, Any]) -> str:
    """sha256 over a state dict's tensors in name order: name, dtype, shape and raw bytes of each.

    Independent of the checkpoint file's serialisation (zip layout, archive name, optimizer state), so
    it says whether two checkpoints hold the same weights.
    """
    import torch

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        value = state_dict[name]
        if not isinstance(value, torch.Tensor):
            digest.update(f"{name}|{value!r}\n".encode())
            continue
        tensor = value.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def retrieval_identity(manifest: pd.DataFrame, split: str, lang: str, dataset: str, state_dir: Any = True) -> dict[str, Any]:
    """Content hash of one retrieval benchmark: the rows of ``split`` and ``lang`` that evaluation scores.

    Each image is its file's md5 with the sorted list of its captions; the benchmark is the sorted list of
    images. Row order, image ids and file locations do not matter; image bytes, captions and which caption
    belongs to which image do.
    """
    rows = manifest[(manifest["split"] == split) & (manifest["lang"] == lang)]
    md5 = file_md5s(rows["image_path"], state_dir)
    images = sorted(
        [md5[str(group["image_path"].iloc[0])], sorted(group["caption"].astype(str))]
        for _, group in rows.groupby("image_id", sort=False)
    )
    return {"dataset": dataset, "split": split, "language": lang, "n_images": len(images), "n_captions": int(len(rows)),
            "sha256": _sha256_json({"kind": "retrieval", "images": images})}


def zero_shot_identity(
    images: pd.DataFrame, classnames: Sequence[str], templates: Sequence[str], dataset: str, lang: str,
    state_dir: Any = True,
) -> dict[str, Any]:
    """Content hash of a zero-shot set: each image's md5 with its label, the class names (label i is
    ``classnames[i]``) and the prompt templates."""
    md5 = file_md5s(images["image_path"], state_dir)
    table = sorted([md5[str(p)], int(label)] for p, label in zip(images["image_path"], images["label"]))
    return {"dataset": dataset, "language": lang, "n_images": len(table), "n_classes": len(classnames),
            "sha256": _sha256_json({"kind": "zero_shot", "images": table, "classnames": list(classnames),
                                    "templates": list(templates)})}


def probe_identity(pairs: Sequence[Sequence[str]], dataset: str, state_dir: Any = True) -> dict[str, Any]:
    """Content hash of compositional-probe pairs ``(image_path, true caption, swapped caption, attribute)``."""
    md5 = file_md5s([p[0] for p in pairs], state_dir)
    items = sorted([md5[str(p[0])], *map(str, p[1:])] for p in pairs)
    return {"dataset": dataset, "n_pairs": len(items), "sha256": _sha256_json({"kind": "probe", "pairs": items})}


def combine_identities(blocks: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``{"sha256", "datasets", "blocks"}``: one hash over every block's hash (keyed by block name)."""
    return {
        "sha256": _sha256_json({name: block["sha256"] for name, block in blocks.items()}),
        "datasets": ", ".join(f"{name}={block['dataset']}" for name, block in blocks.items()),
        "blocks": {name: dict(block) for name, block in blocks.items()},
    }


def evaluation_data_identity(
    manifest: pd.DataFrame,
    split: str,
    retrieval: Mapping[str, tuple[str, str]],
    zero_shot: Mapping[str, Any] | None = None,
    probe_pairs: Sequence[Sequence[str]] = (),
    probe_dataset: str = "",
    state_dir: Any = True,
) -> dict[str, Any]:
    """What an evaluation scored, by content, per metrics block and as one hash.

    Args:
        manifest: the manifest table the retrieval blocks read.
        split: the evaluated split.
        retrieval: block name -> ``(language, dataset name)``, e.g. ``{"retrieval": ("en", "demo-flickr")}``.
        zero_shot: ``{"images", "classnames", "templates", "lang", "dataset"}`` or None (block ``zero_shot``).
        probe_pairs: compositional-probe pairs (block ``compositional``; skipped when empty).
        probe_dataset: dataset name of the probe.

    Returns:
        ``{"sha256": <hash of all blocks>, "datasets": "retrieval=demo-flickr, ...", "blocks": {name: {...}}}``.
    """
    blocks: dict[str, dict[str, Any]] = {}
    for name, (lang, dataset) in retrieval.items():
        blocks[name] = retrieval_identity(manifest, split, lang, dataset, state_dir)
    if zero_shot is not None:
        blocks["zero_shot"] = zero_shot_identity(zero_shot["images"], zero_shot["classnames"], zero_shot["templates"],
                                                 zero_shot["dataset"], zero_shot["lang"], state_dir)
    if probe_pairs:
        blocks["compositional"] = probe_identity(probe_pairs, probe_dataset, state_dir)
    return combine_identities(blocks)
