"""Loaders for the dataset formats vlalign reads, returning manifest tables (docs/INTERFACES.md §1, §3).

- Karpathy JSON (Flickr30k / COCO splits by Karpathy & Fei-Fei, and the demo dataset):
  ``{"images": [{"filename", "filepath"?, "imgid", "split", "sentences": [{"raw", "sentid", ...}], ...}]}``
- ImageNet-style class folders: ``root/<wnid>/<image>``.
- COCO-CN (li-xirong/coco-cn): split lists + ``imageid.human-written-caption.txt`` (:func:`load_coco_cn`).
- ImageNet validation, flat layout: one image folder + a label file (:func:`load_imagenet_flat`).
- Line files: one entry per line (class names, prompt templates, wnids).

Structural problems (missing file, bad JSON, missing or mistyped field) raise
:class:`~vlalign.errors.DatasetFormatError` naming the file and the field. Content problems that
concern single rows (an image file that is missing or does not decode, a too-short caption, an
image in two splits) are left to the validation suite (:mod:`vlalign.validation.expectations`),
which quarantines the offending rows instead of failing the whole corpus.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
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
    lines = [line.strip() for line in _read_text_lines(path, "a UTF-8 text file with one entry per line")]
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


# ---------------------------------------------------------------------------------------------
# COCO-CN (li-xirong/coco-cn, version 201805)
# ---------------------------------------------------------------------------------------------

#: Split-list file name of each COCO-CN split, as in the release.
COCO_CN_SPLIT_FILES = {"train": "coco-cn_train.txt", "val": "coco-cn_val.txt", "test": "coco-cn_test.txt"}
#: Caption file of the release with the human-written Chinese sentences (the retrieval benchmark's texts).
COCO_CN_CAPTIONS_FILE = "imageid.human-written-caption.txt"
#: An MS-COCO 2014 image id as COCO-CN writes it; group 1 is the image folder (``train2014``/``val2014``).
_COCO_ID = re.compile(r"^COCO_((?:train|val)2014)_\d{12}$")


def _read_text_lines(path: Path, what: str) -> list[str]:
    """The lines of a UTF-8 text file (a byte-order mark is dropped), or a DatasetFormatError."""
    if not path.is_file():
        raise DatasetFormatError(f"{path}: file not found; expected {what}. Check the path in the data catalog.")
    try:
        # "\n" only: str.splitlines() would also break lines at U+2028/U+0085 inside a caption.
        return [line.removesuffix("\r") for line in path.read_text(encoding="utf-8-sig").split("\n")]
    except UnicodeDecodeError as exc:
        raise DatasetFormatError(f"{path}: not UTF-8 text ({exc}); expected {what}. Re-save it as UTF-8.") from exc


def _coco_id(path: Path, number: int, text: str) -> tuple[str, str]:
    """``(image_id, folder)`` of a COCO id (``.jpg`` suffix tolerated), or a DatasetFormatError naming the line."""
    image_id = text[:-4] if text.lower().endswith(".jpg") else text
    match = _COCO_ID.match(image_id)
    if match is None:
        raise DatasetFormatError(
            f"{path}: line {number}: {text!r} is not an MS-COCO 2014 image id; expected e.g. "
            "'COCO_val2014_000000290833' (COCO_<train2014|val2014>_<12 digits>). Fix or delete the line."
        )
    return image_id, match.group(1)


def _image_folders(image_roots: str | Path | Mapping[str, str | Path]) -> Callable[[str], Path]:
    if isinstance(image_roots, Mapping):
        roots = {str(k): Path(v) for k, v in image_roots.items()}

        def folder(name: str) -> Path:
            if name not in roots:
                raise ConfigError(
                    f"load_coco_cn: image_roots has no entry for {name!r} (it has {sorted(roots)}); "
                    "give the folder of the MS-COCO train2014 and val2014 images."
                )
            return roots[name]

        return folder
    base = Path(image_roots)
    return lambda name: base / name


def load_coco_cn(
    root: str | Path,
    image_roots: str | Path | Mapping[str, str | Path],
    splits: Sequence[str] = ("train", "val", "test"),
    captions_file: str | Path = COCO_CN_CAPTIONS_FILE,
    split_files: Mapping[str, str | Path] | None = None,
    id_prefix: str = "",
) -> pd.DataFrame:
    """Read the COCO-CN release into a manifest table (one row per Chinese caption, ``lang="zh"``).

    Files assumed (the layout of github.com/li-xirong/coco-cn, version 201805), all UTF-8 text under ``root``:

    - split lists ``coco-cn_train.txt``, ``coco-cn_val.txt``, ``coco-cn_test.txt``: one MS-COCO image id
      per line, e.g. ``COCO_val2014_000000290833`` (a trailing ``.jpg`` is tolerated, blank lines are skipped);
    - ``imageid.human-written-caption.txt``: one caption per line, ``<image_id>#<n>\\t<caption>``, e.g.
      ``COCO_val2014_000000290833#0\\t一个...``; ``n`` numbers the captions of an image (0, 1, ...).
      ``imageid.manually-translated-caption.txt`` has the same format and may be given as ``captions_file``.

    Images are the MS-COCO 2014 files ``<folder>/<image_id>.jpg`` where ``<folder>`` is the id's
    ``train2014`` / ``val2014`` part. ``image_roots`` is either one folder holding ``train2014/`` and
    ``val2014/`` or a mapping ``{"train2014": dir, "val2014": dir}``.

    Args:
        root: folder of the split lists and the caption file (relative file names are resolved against it).
        image_roots: see above.
        splits: COCO-CN splits to read (``train``, ``val``, ``test``); captions of other images are ignored.
        captions_file: caption file name or path.
        split_files: overrides of the split-list file names, ``{split: file}``.
        id_prefix: prepended to ``image_id`` (and inside ``caption_id``) when corpora are combined.

    ``image_id`` is ``id_prefix + <COCO id>``, ``caption_id`` is ``"zh:" + image_id + "#<n>"`` and
    ``source`` is ``"<caption file>:<line>"``. Rows follow the order of ``splits``, then the split list,
    then ``n``. Raises :class:`DatasetFormatError` naming the file and line for a missing file, a
    malformed line, a repeated caption or image id, an image listed in two splits, or a listed image
    without any caption. Image files are not opened (the validation suite checks them).
    """
    root = Path(root)
    unknown = [s for s in splits if s not in COCO_CN_SPLIT_FILES]
    if unknown or not splits:
        raise ConfigError(f"load_coco_cn: splits={list(splits)}; expected a non-empty subset of {list(COCO_CN_SPLIT_FILES)}.")
    files = {**COCO_CN_SPLIT_FILES, **dict(split_files or {})}
    folder_of = _image_folders(image_roots)

    def at_root(name: str | Path) -> Path:
        path = Path(name)
        return path if path.is_absolute() else root / path

    # 1. Split lists: image id -> (split, list file, line).
    split_of: dict[str, tuple[str, Path, int]] = {}
    ordered: list[tuple[str, str, str]] = []  # (split, image_id, folder)
    for split in splits:
        path = at_root(files[split])
        lines = _read_text_lines(path, f"the COCO-CN {split} split list (one image id per line)")
        for number, line in enumerate(lines, start=1):
            text = line.strip()
            if not text:
                continue
            image_id, folder = _coco_id(path, number, text)
            if image_id in split_of:
                other_split, other_path, other_line = split_of[image_id]
                raise DatasetFormatError(
                    f"{path}: line {number}: image {image_id} is already listed in {other_path} line {other_line} "
                    f"(split {other_split!r}); expected each image in one split. Remove the duplicate."
                )
            split_of[image_id] = (split, path, number)
            ordered.append((split, image_id, folder))
    if not ordered:
        raise DatasetFormatError(f"{root}: the split lists {[files[s] for s in splits]} list no images.")

    # 2. Captions of the listed images.
    cap_path = at_root(captions_file)
    captions: dict[str, list[tuple[int, str, int]]] = {}
    seen: dict[str, int] = {}
    lines = _read_text_lines(cap_path, "the COCO-CN caption file (<image_id>#<n><TAB><caption> per line)")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        image_text, hash_mark, n_text = key.strip().rpartition("#")
        if not tab or not hash_mark or not n_text.isdigit():
            shown = line if len(line) <= 60 else line[:57] + "..."
            raise DatasetFormatError(
                f"{cap_path}: line {number}: {shown!r} is not '<image_id>#<n><TAB><caption>'; expected e.g. "
                "'COCO_val2014_000000290833#0\\t<Chinese caption>'. Fix or delete the line."
            )
        image_id, _ = _coco_id(cap_path, number, image_text)
        if key.strip() in seen:
            raise DatasetFormatError(
                f"{cap_path}: line {number}: caption id {key.strip()!r} repeats line {seen[key.strip()]}; "
                "expected each <image_id>#<n> once. Remove or renumber the duplicate."
            )
        seen[key.strip()] = number
        if image_id in split_of:
            captions.setdefault(image_id, []).append((int(n_text), caption.strip(), number))

    # 3. Manifest rows, and a check that every listed image has a caption.
    checked_folders: set[str] = set()
    rows: dict[str, list] = {col: [] for col in MANIFEST_COLUMNS}
    for split, image_id, folder in ordered:
        if image_id not in captions:
            _, list_path, line = split_of[image_id]
            raise DatasetFormatError(
                f"{list_path}: line {line}: image {image_id} has no caption in {cap_path}; expected at least "
                f"one '{image_id}#0\\t...' line. Use the caption file of the same COCO-CN release."
            )
        image_dir = folder_of(folder)
        if folder not in checked_folders:
            if not image_dir.is_dir():
                raise DatasetFormatError(
                    f"{image_dir}: MS-COCO image folder {folder} not found (needed for {image_id} in split "
                    f"{split!r}); expected the {folder} images as <id>.jpg. Fix image_roots in the data catalog."
                )
            checked_folders.add(folder)
        image_path = os.path.abspath(image_dir / f"{image_id}.jpg")
        for n, caption, line in sorted(captions[image_id]):
            rows["image_id"].append(f"{id_prefix}{image_id}")
            rows["image_path"].append(image_path)
            rows["caption"].append(caption)
            rows["caption_id"].append(f"zh:{id_prefix}{image_id}#{n}")
            rows["split"].append(split)
            rows["lang"].append("zh")
            rows["source"].append(f"{cap_path.name}:{line}")
    return pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))


# ---------------------------------------------------------------------------------------------
# ImageNet-1k validation set, flat layout
# ---------------------------------------------------------------------------------------------


def _image_files(image_dir: Path) -> list[Path]:
    return sorted(p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _parse_label(path: Path, number: int, text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise DatasetFormatError(
            f"{path}: line {number}: label {text.strip()!r} is not an integer; expected one integer class "
            "index. Fix or delete the line."
        ) from None


def _read_flat_labels(labels_file: Path, image_dir: Path, files: list[Path]) -> list[tuple[Path, int, int]]:
    """``(image file, label, line)`` per image from a plain-integer or ``filename,label`` CSV label file."""
    lines = _read_text_lines(labels_file, "an ImageNet label file")
    if labels_file.suffix.lower() != ".csv":
        while lines and not lines[-1].strip():
            lines.pop()
        if len(lines) != len(files):
            raise DatasetFormatError(
                f"{labels_file}: {len(lines)} labels for {len(files)} image files in {image_dir}; expected one "
                "label per line, line i = the i-th image in file-name order (as ILSVRC2012_validation_ground_truth.txt)."
            )
        return [(f, _parse_label(labels_file, k, line), k) for k, (f, line) in enumerate(zip(files, lines), start=1)]
    rows = list(csv.reader(lines))
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if "filename" not in header or "label" not in header:
        raise DatasetFormatError(
            f"{labels_file}: line 1 is {rows[0] if rows else 'missing'}; expected a CSV header with columns "
            "'filename,label'. Add the header."
        )
    name_col, label_col = header.index("filename"), header.index("label")
    by_name = {f.name: f for f in files}
    out, seen = [], {}
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(name_col, label_col):
            raise DatasetFormatError(f"{labels_file}: line {number}: {row}; expected {len(header)} columns {header}.")
        name = row[name_col].strip()
        if name in seen:
            raise DatasetFormatError(f"{labels_file}: line {number}: {name!r} repeats line {seen[name]}; expected one label per image.")
        seen[name] = number
        if name not in by_name:
            raise DatasetFormatError(
                f"{labels_file}: line {number}: image {name!r} not found in {image_dir}; expected a file name "
                "of that folder. Check that the images were extracted, or delete the line."
            )
        out.append((by_name[name], _parse_label(labels_file, number, row[label_col]), number))
    unlabelled = sorted(set(by_name) - set(seen))
    if unlabelled:
        raise DatasetFormatError(
            f"{labels_file}: no label for {len(unlabelled)} image(s) of {image_dir}, e.g. {unlabelled[:3]}; "
            "expected a 'filename,label' row for every image."
        )
    return sorted(out, key=lambda row: row[0].name)


def load_imagenet_flat(
    image_dir: str | Path,
    labels_file: str | Path,
    index_base: int = 0,
    label_wnids_file: str | Path | None = None,
    wnids_file: str | Path | None = None,
) -> pd.DataFrame:
    """Read a flat ImageNet validation folder plus a label file into ``DataFrame[image_path, label, wnid]``.

    Layout assumed: all images in one folder (``ILSVRC2012_val_00000001.JPEG`` ...; any image suffix)
    and one label file, either

    - plain text (any suffix but ``.csv``): one integer per line, line i = label of the i-th image in
      file-name order, as the devkit's ``ILSVRC2012_validation_ground_truth.txt``; or
    - CSV with a header holding ``filename`` and ``label`` columns (other columns ignored).

    Label convention: by default labels are 0-based class indices in the standard order (sorted wnids,
    as torchvision and the open_clip / cn-clip class-name lists use). **The devkit ground-truth file is
    different**: it holds 1-based ``ILSVRC2012_ID`` values in the devkit's ``meta.mat`` order. For it pass
    ``index_base=1`` and ``label_wnids_file`` (line i = wnid of ID i, exported from ``meta.mat``); labels
    are then remapped to the position of their wnid in ``wnids_file``, or in the sorted wnids of
    ``label_wnids_file`` when ``wnids_file`` is not given. ``wnid`` is ``None`` when no wnid file is given.

    Rows are sorted by file name. Raises :class:`DatasetFormatError` naming the file and line for a
    missing folder/file, a non-integer or out-of-range label, a count mismatch, or unknown file names.
    """
    image_dir, labels_file = Path(image_dir), Path(labels_file)
    if not image_dir.is_dir():
        raise DatasetFormatError(
            f"{image_dir}: ImageNet image folder not found; expected one folder holding the validation images "
            "(ILSVRC2012_val_00000001.JPEG, ...). Fix the path in the data catalog."
        )
    files = _image_files(image_dir)
    if not files:
        raise DatasetFormatError(f"{image_dir}: no image files (suffixes {list(IMAGE_SUFFIXES)}); check that the images were extracted.")
    if index_base not in (0, 1):
        raise ConfigError(f"load_imagenet_flat: index_base={index_base!r}; expected 0 or 1.")
    labelled = _read_flat_labels(labels_file, image_dir, files)
    label_wnids = load_lines(label_wnids_file) if label_wnids_file is not None else None
    target = load_lines(wnids_file) if wnids_file is not None else (sorted(label_wnids) if label_wnids else None)
    index = {w: i for i, w in enumerate(target)} if target is not None else None
    rows = []
    for path, raw, line in labelled:
        label = raw - index_base
        n_classes = len(label_wnids) if label_wnids is not None else None
        if label < 0 or (n_classes is not None and label >= n_classes):
            valid = f"{index_base}..{index_base + n_classes - 1}" if n_classes is not None else f">= {index_base}"
            raise DatasetFormatError(
                f"{labels_file}: line {line}: label {raw} is out of range; expected {valid} "
                f"(index_base={index_base}). Check index_base and the label file."
            )
        wnid = None
        if label_wnids is not None:
            wnid = label_wnids[label]
            if wnid not in index:
                raise DatasetFormatError(
                    f"{labels_file}: line {line}: class {wnid} (label {raw}) is not listed in {wnids_file}; "
                    "expected the same 1,000 wnids in both files."
                )
            label = index[wnid]
        elif target is not None and label >= len(target):
            raise DatasetFormatError(
                f"{labels_file}: line {line}: label {raw} is out of range for the {len(target)} classes of {wnids_file}."
            )
        if target is not None and wnid is None:
            wnid = target[label]
        rows.append((os.path.abspath(path), label, wnid))
    return pd.DataFrame(rows, columns=["image_path", "label", "wnid"])
