"""Loaders for the dataset formats vlalign reads, returning manifest tables (docs/INTERFACES.md §1, §3).

- Karpathy JSON (Flickr30k / COCO splits by Karpathy & Fei-Fei, and the demo dataset):
  ``{"images": [{"filename", "filepath"?, "imgid", "split", "sentences": [{"raw", "sentid", ...}], ...}]}``
- ImageNet-style class folders: ``root/<wnid>/<image>``.
- Line files: one entry per line (class names, prompt templates, wnids).

Structural problems (missing file, bad JSON, missing or mistyped field) raise
:class:`~vlalign.errors.DatasetFormatError` naming the file and the field. Content problems that
concern single rows (an image file that is missing or does not decode, a too-short caption, an
image in two splits) are left to the validation suite (:mod:`vlalign.validation.expectations`),
which quarantines the offending rows instead of failing the whole corpus.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from vlalign.errors import ConfigError, DatasetFormatError

#: Columns of a manifest table, in order (docs/INTERFACES.md §1).
MANIFEST_COLUMNS = ("image_id", "image_path", "caption", "caption_id", "split", "lang", "source")
#: Karpathy split names and the manifest split each maps to.
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
#: Languages a manifest may hold.
LANGS = ("en", "zh")
#: File suffixes treated as images in class folders (compared lowercase).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field_error(path: Path, where: str, expected: str, found: object, todo: str) -> DatasetFormatError:
    shown = repr(found)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return DatasetFormatError(f"{path}: {where} is {shown}; expected {expected}. {todo}")


def _read_json(path: Path) -> object:
    if not path.is_file():
        raise DatasetFormatError(
            f"{path}: file not found; expected a Karpathy-format JSON file. Check the path in the data "
            "catalog / parameters, or generate the demo dataset with vlalign.data.demo.generate_demo_dataset."
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DatasetFormatError(f"{path}: not UTF-8 text ({exc}); re-save the file as UTF-8 JSON.") from exc
    except json.JSONDecodeError as exc:
        raise DatasetFormatError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}. The file is probably "
            "truncated or hand-edited; restore it from its source."
        ) from exc


def load_karpathy(json_path: Path, image_root: Path, lang: str = "en", id_prefix: str = "") -> pd.DataFrame:
    """Read a Karpathy-format caption file into a manifest table (one row per caption).

    Args:
        json_path: the ``dataset_*.json`` file.
        image_root: folder the image paths are relative to: ``image_root/[filepath/]filename``.
        lang: language of the captions, ``"en"`` or ``"zh"``.
        id_prefix: prepended to every ``image_id`` and sentence id, to keep ids unique when several
            corpora are combined (e.g. ``"coco:"``); empty by default.

    ``restval`` maps to ``train``. ``image_id`` is ``id_prefix + str(imgid)`` and ``caption_id`` is
    ``f"{lang}:{id_prefix}{sentid}"``. Image files are not opened here (the validation suite checks them).
    """
    if lang not in LANGS:
        raise ConfigError(f"load_karpathy({json_path}): lang={lang!r}; expected one of {list(LANGS)}.")
    json_path = Path(json_path)
    image_root = Path(image_root)
    data = _read_json(json_path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        found = type(data).__name__ if not isinstance(data, dict) else f"keys {sorted(data)[:6]}"
        raise DatasetFormatError(
            f"{json_path}: top level is {found}; expected an object with an \"images\" list (Karpathy "
            "format). Use the dataset_<name>.json file from the Karpathy splits, not another caption file."
        )
    if not image_root.is_dir():
        raise DatasetFormatError(
            f"{image_root}: image folder for {json_path.name} not found; expected the folder holding the "
            "images named by its \"filename\" fields. Fix image_root in the data catalog / parameters."
        )
    root = os.path.abspath(image_root)
    name = json_path.name
    todo = f"Fix or remove this entry in {name}."
    rows: dict[str, list] = {col: [] for col in MANIFEST_COLUMNS}
    seen_sentids: dict[int | str, str] = {}
    for i, image in enumerate(data["images"]):
        where = f"images[{i}]"
        if not isinstance(image, dict):
            raise _field_error(json_path, where, "an object", image, todo)
        filename = image.get("filename")
        if not isinstance(filename, str) or not filename.strip():
            expected = "a non-empty string (the image file name)"
            raise _field_error(json_path, f"{where}.filename", expected, filename, todo)
        filepath = image.get("filepath", "")
        if not isinstance(filepath, str):
            expected = "a string (sub-folder of the image root)"
            raise _field_error(json_path, f"{where}.filepath", expected, filepath, todo)
        imgid = image.get("imgid")
        if not (_is_int(imgid) or (isinstance(imgid, str) and imgid.strip())):
            raise _field_error(json_path, f"{where}.imgid", "an integer image id", imgid, todo)
        split = image.get("split")
        if split not in KARPATHY_SPLITS:
            raise _field_error(json_path, f"{where}.split", f"one of {list(KARPATHY_SPLITS)}", split, todo)
        sentences = image.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            raise _field_error(json_path, f"{where}.sentences", "a non-empty list of sentence objects", sentences, todo)
        image_path = os.path.join(root, filepath, filename)
        for j, sentence in enumerate(sentences):
            s_where = f"{where}.sentences[{j}]"
            if not isinstance(sentence, dict):
                raise _field_error(json_path, s_where, "an object with \"raw\" and \"sentid\"", sentence, todo)
            raw = sentence.get("raw")
            if not isinstance(raw, str):
                raise _field_error(json_path, f"{s_where}.raw", "a string (the caption)", raw, todo)
            sentid = sentence.get("sentid")
            if not (_is_int(sentid) or (isinstance(sentid, str) and sentid.strip())):
                raise _field_error(json_path, f"{s_where}.sentid", "an integer sentence id", sentid, todo)
            if "imgid" in sentence and sentence["imgid"] != imgid:
                raise _field_error(
                    json_path, f"{s_where}.imgid", f"{imgid!r} (the imgid of its image)", sentence["imgid"], todo
                )
            if sentid in seen_sentids:
                raise DatasetFormatError(
                    f"{json_path}: {s_where}.sentid={sentid!r} repeats the sentid of {seen_sentids[sentid]}; "
                    f"expected sentence ids unique within the file. {todo}"
                )
            seen_sentids[sentid] = s_where
            rows["image_id"].append(f"{id_prefix}{imgid}")
            rows["image_path"].append(image_path)
            rows["caption"].append(raw)
            rows["caption_id"].append(f"{lang}:{id_prefix}{sentid}")
            rows["split"].append(KARPATHY_SPLITS[split])
            rows["lang"].append(lang)
            rows["source"].append(f"{name}:{s_where}")
    if not rows["image_id"]:
        raise DatasetFormatError(f"{json_path}: the \"images\" list is empty; expected at least one image entry.")
    return pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))


def load_corpus(sources: list[dict]) -> pd.DataFrame:
    """Concatenate the manifests of several Karpathy files.

    Each source is ``{"json": path, "image_root": path, "lang": "en"|"zh", "id_prefix": str (optional)}``.
    Caption ids must be unique across sources; give corpora distinct ``id_prefix`` values when their
    sentence ids overlap.
    """
    if not sources:
        raise ConfigError("load_corpus: no sources given; expected a list of {json, image_root, lang} dicts.")
    frames = []
    for k, source in enumerate(sources):
        if not isinstance(source, dict):
            raise ConfigError(f"load_corpus: sources[{k}] is {source!r}; expected a dict with json, image_root, lang.")
        missing = [key for key in ("json", "image_root", "lang") if key not in source]
        if missing:
            raise ConfigError(f"load_corpus: sources[{k}] lacks {missing}; each source needs json, image_root, lang.")
        frames.append(
            load_karpathy(
                Path(source["json"]), Path(source["image_root"]), source["lang"], source.get("id_prefix", "")
            )
        )
    manifest = pd.concat(frames, ignore_index=True)
    duplicated = manifest["caption_id"].duplicated(keep=False)
    if duplicated.any():
        clash = manifest.loc[duplicated, ["caption_id", "source"]].head(2).to_dict("records")
        raise DatasetFormatError(
            f"load_corpus: caption_id {clash[0]['caption_id']!r} occurs in {clash[0]['source']} and "
            f"{clash[1]['source']}; expected caption ids unique across sources. Give the sources distinct "
            "\"id_prefix\" values."
        )
    return manifest


def load_imagefolder(root: Path, wnids_file: Path | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Read an ImageNet-style folder ``root/<wnid>/<image>`` into ``(table, wnids)``.

    ``table`` has columns ``image_path`` (absolute str), ``label`` (int class index) and ``wnid``;
    rows are sorted by label then file name. Class ``i`` is ``wnids[i]``: the sorted sub-folder names,
    or the lines of ``wnids_file`` when given (then every sub-folder must be listed there, and listed
    classes may lack a folder). Files whose suffix is not an image suffix are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetFormatError(
            f"{root}: class-folder dataset not found; expected a directory with one sub-folder per class "
            "(ImageNet layout root/<wnid>/<image>). Fix the path in the data catalog / parameters."
        )
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DatasetFormatError(
            f"{root}: no class sub-folders; expected ImageNet layout root/<wnid>/<image>. A flat folder of "
            "images with a separate label file must be rearranged into one folder per class first."
        )
    if wnids_file is not None:
        wnids = load_lines(wnids_file)
        if len(set(wnids)) != len(wnids):
            repeated = next(w for w in wnids if wnids.count(w) > 1)
            raise DatasetFormatError(f"{wnids_file}: class {repeated!r} is listed twice; expected each wnid once.")
        unknown = [f for f in folders if f not in set(wnids)]
        if unknown:
            raise DatasetFormatError(
                f"{root}: class folders {unknown[:5]} are not listed in {wnids_file}; expected every folder "
                "to be a listed class. Add them to the wnids file or remove the folders."
            )
    else:
        wnids = folders
    index = {wnid: i for i, wnid in enumerate(wnids)}
    rows = []
    for wnid in folders:
        for path in sorted((root / wnid).iterdir()):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                rows.append((os.path.abspath(path), index[wnid], wnid))
    if not rows:
        raise DatasetFormatError(
            f"{root}: the class folders hold no image files (suffixes {list(IMAGE_SUFFIXES)}); expected "
            "root/<wnid>/<image>. Check that the images were extracted."
        )
    return pd.DataFrame(rows, columns=["image_path", "label", "wnid"]), wnids


def load_lines(path: Path, must_contain: str | None = None) -> list[str]:
    """Read a one-entry-per-line text file (class names, prompt templates, wnids).

    Surrounding whitespace is stripped and trailing blank lines are ignored; a blank line before the
    last entry is an error, since line ``i`` is entry ``i``. With ``must_contain`` (e.g. ``"{}"`` for
    prompt templates) every line must contain that text.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"{path}: file not found; expected a UTF-8 text file with one entry per line.")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise DatasetFormatError(f"{path}: not UTF-8 text ({exc}); re-save the file as UTF-8.") from exc
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise DatasetFormatError(f"{path}: the file is empty; expected one entry per line.")
    for number, line in enumerate(lines, start=1):
        if not line:
            raise DatasetFormatError(
                f"{path}: line {number} is blank; expected one entry per line (line i = entry i). "
                "Delete the blank line."
            )
        if must_contain is not None and must_contain not in line:
            raise DatasetFormatError(
                f"{path}: line {number} ({line!r}) lacks {must_contain!r}; expected it on every line "
                f"(e.g. a prompt template with {{}} for the class name)."
            )
    return lines
