"""Loaders for the dataset formats vlalign reads, returning manifest tables (docs/INTERFACES.md §1, §3).

- Karpathy JSON (Flickr30k / COCO splits by Karpathy & Fei-Fei, and the demo dataset):
  ``{"images": [{"filename", "filepath"?, "imgid", "split", "sentences": [{"raw", "sentid", ...}], ...}]}``
- ImageNet-style class folders: ``root/<wnid>/<image>``.
- COCO-CN (li-xirong/coco-cn): split lists + ``imageid.human-written-caption.txt`` (:func:`load_coco_cn`).
- ImageNet validation, flat layout: one image folder + a label file (:func:`load_imagenet_flat`).
- Line files: one entry per line (class names, prompt templates, wnids).

Every loader returns a table in which each input entry is present: a corpus is untrusted input, and a bad entry
is quarantined with its reason, never dropped silently and never allowed to stop the rest of the corpus.

- **File-level faults** stop the load with a :class:`~vlalign.errors.DatasetFormatError` naming the file: a required
  file or folder is missing, a file is not UTF-8 or not JSON, the top-level shape is wrong.
- **Entry-level faults** (a missing or wrong-typed field, a caption that is not a string, an id that is not an
  integer, a repeated id) become rows whose ``load_error`` column says which field, what it holds and what was
  expected; the validation suite (:mod:`vlalign.validation.expectations`) quarantines them.
- **Image references** are not opened here. Each row carries its allowed image roots (``image_root``, resolved
  when the configuration is read, see :mod:`vlalign.data.images`); validation checks containment, file type,
  existence, size and decoding, and quarantines the rows that fail.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from vlalign.data.images import encode_roots, resolve_roots
from vlalign.errors import ConfigError, DatasetFormatError

#: Columns of a manifest table, in order (docs/INTERFACES.md §1).
MANIFEST_COLUMNS = (
    "image_id", "image_path", "caption", "caption_id", "split", "lang", "source", "entry", "image_root", "load_error",
)
#: Sub-folders of a Karpathy image root that the format documents (COCO's ``filepath``), which may be links.
KARPATHY_LINKABLE_SUBFOLDERS = ("train2014", "val2014")
#: Karpathy split names and the manifest split each maps to.
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
#: Languages a manifest may hold.
LANGS = ("en", "zh")
#: File suffixes treated as images in class folders (compared lowercase).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(found: object) -> str:
    shown = repr(found)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def _problem(where: str, expected: str, found: object) -> str:
    """The quarantine reason of a malformed field: where, what it holds, what was expected."""
    return f"{where} is {_shown(found)}; expected {expected}"


def _missing(data: dict, key: str) -> object:
    return data[key] if key in data else _Missing()


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


class _Missing:
    def __repr__(self) -> str:
        return "missing"


class _Rows:
    """Collects manifest rows column by column (one row per caption; one placeholder row for an entry whose
    captions cannot be read), each with its entry, its allowed image roots and its load error (None = well-formed)."""

    def __init__(self) -> None:
        self.columns: dict[str, list] = {col: [] for col in MANIFEST_COLUMNS}

    def add(self, **values: object) -> None:
        for col in MANIFEST_COLUMNS:
            self.columns[col].append(values.get(col))

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.columns, columns=list(MANIFEST_COLUMNS))


def _safe_relative(value: str) -> bool:
    """A relative path without '..' components (a sub-folder name of the image root)."""
    parts = Path(value).parts
    return bool(value) and not os.path.isabs(value) and ".." not in parts


def image_roots_for(image_root: str | Path, extra_roots: Sequence[str | Path] = (),
                    linkable: Sequence[str] = ()) -> list[str]:
    """Resolved allowed roots of a source: its image root, the documented sub-folders ``linkable`` that exist
    under it (each may be a link to another disk, e.g. COCO's ``train2014/``), then ``extra_roots``."""
    base = Path(image_root)
    subfolders = [base / name for name in linkable if (base / name).is_dir()]
    return resolve_roots([base, *subfolders, *extra_roots])


def load_karpathy(
    json_path: Path,
    image_root: Path,
    lang: str = "en",
    id_prefix: str = "",
    extra_image_roots: Sequence[str | Path] = (),
) -> pd.DataFrame:
    """Read a Karpathy-format caption file into a manifest table (one row per caption).

    Args:
        json_path: the ``dataset_*.json`` file.
        image_root: folder the image paths are relative to: ``image_root/[filepath/]filename``. Images must
            resolve inside it (or inside its ``train2014/`` / ``val2014/`` sub-folders, the Karpathy COCO layout,
            which may be links), or inside ``extra_image_roots``; the validation suite quarantines any other.
        lang: language of the captions, ``"en"`` or ``"zh"``.
        id_prefix: prepended to every ``image_id`` and sentence id, to keep ids unique when several
            corpora are combined (e.g. ``"coco:"``); empty by default.
        extra_image_roots: further folders images may resolve into (explicitly allowed by the configuration).

    ``restval`` maps to ``train``. ``image_id`` is ``id_prefix + str(imgid)`` and ``caption_id`` is
    ``f"{lang}:{id_prefix}{sentid}"``. Image files are not opened here (the validation suite checks them).

    Only file-level faults raise :class:`DatasetFormatError`: the file is missing, not UTF-8, not JSON, or not an
    object with an ``"images"`` list; the image root is missing. A malformed entry (a missing or wrong-typed field,
    an unknown split, a repeated ``imgid``) yields its rows with ``load_error`` set to the reason; a malformed
    sentence (no ``raw`` string, a bad or repeated ``sentid``) sets ``load_error`` on its own row only. The
    validation suite quarantines those rows, so the rest of the corpus loads.
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
    roots = encode_roots(image_roots_for(image_root, extra_image_roots, KARPATHY_LINKABLE_SUBFOLDERS))
    name = json_path.name
    rows = _Rows()
    seen_sentids: dict[object, str] = {}
    seen_imgids: dict[object, str] = {}
    for i, image in enumerate(data["images"]):
        where = f"images[{i}]"
        entry = f"{name}:{where}"
        if not isinstance(image, dict):
            rows.add(entry=entry, source=entry, lang=lang, image_root=roots,
                     load_error=_problem(where, "an image object", image))
            continue
        filename, filepath = _missing(image, "filename"), image.get("filepath", "")
        imgid, split, sentences = _missing(image, "imgid"), _missing(image, "split"), _missing(image, "sentences")
        problems = []
        if not isinstance(filename, str) or not filename.strip():
            problems.append(_problem(f"{where}.filename", "a non-empty string (the image file name)", filename))
        if not isinstance(filepath, str):
            problems.append(_problem(f"{where}.filepath", "a string (sub-folder of the image root)", filepath))
        if not (_is_int(imgid) or (isinstance(imgid, str) and imgid.strip())):
            problems.append(_problem(f"{where}.imgid", "an integer image id", imgid))
        elif imgid in seen_imgids:
            problems.append(f"{where}.imgid={imgid!r} repeats the imgid of {seen_imgids[imgid]}; expected image ids "
                            "unique within the file (the entries are not merged)")
        else:
            seen_imgids[imgid] = where + (f" ({filename})" if isinstance(filename, str) else "")
        if split not in KARPATHY_SPLITS:
            problems.append(_problem(f"{where}.split", f"one of {list(KARPATHY_SPLITS)}", split))
        if not isinstance(sentences, list) or not sentences:
            problems.append(_problem(f"{where}.sentences", "a non-empty list of sentence objects", sentences))
        entry_error = "; ".join(problems) or None
        image_path = (os.path.join(root, filepath, filename)
                      if isinstance(filename, str) and filename.strip() and isinstance(filepath, str) else None)
        common = {
            "image_id": f"{id_prefix}{imgid}" if _is_int(imgid) or isinstance(imgid, str) else None,
            "image_path": image_path,
            "split": KARPATHY_SPLITS.get(split) if isinstance(split, str) else None,
            "lang": lang, "entry": entry, "image_root": roots,
        }
        if not isinstance(sentences, list) or not sentences:
            rows.add(**common, source=entry, load_error=entry_error)
            continue
        for j, sentence in enumerate(sentences):
            s_where = f"{where}.sentences[{j}]"
            error = entry_error
            raw = sentid = None
            if not isinstance(sentence, dict):
                error = error or _problem(s_where, "an object with \"raw\" and \"sentid\"", sentence)
            else:
                raw, sentid = _missing(sentence, "raw"), _missing(sentence, "sentid")
                if not isinstance(raw, str):
                    error = error or _problem(f"{s_where}.raw", "a string (the caption)", raw)
                    raw = None
                if not (_is_int(sentid) or (isinstance(sentid, str) and sentid.strip())):
                    error = error or _problem(f"{s_where}.sentid", "an integer sentence id", sentid)
                    sentid = None
                elif sentid in seen_sentids:
                    error = error or (f"{s_where}.sentid={sentid!r} repeats the sentid of {seen_sentids[sentid]}; "
                                      "expected sentence ids unique within the file")
                    sentid = None
                else:
                    seen_sentids[sentid] = s_where
                if "imgid" in sentence and sentence["imgid"] != imgid:
                    error = error or _problem(f"{s_where}.imgid", f"{imgid!r} (the imgid of its image)", sentence["imgid"])
            rows.add(**common, caption=raw, source=f"{name}:{s_where}", load_error=error,
                     caption_id=f"{lang}:{id_prefix}{sentid}" if sentid is not None else None)
    manifest = rows.frame()
    if manifest.empty:
        raise DatasetFormatError(f"{json_path}: the \"images\" list is empty; expected at least one image entry.")
    return manifest


def _quarantine_repeated_caption_ids(manifest: pd.DataFrame) -> pd.DataFrame:
    """Mark every row whose caption_id repeats an earlier row's (across sources) with a load error naming it."""
    ids = manifest["caption_id"]
    repeated = ids.notna() & ids.duplicated(keep="first")
    if repeated.any():
        first_source = manifest[ids.notna()].drop_duplicates("caption_id").set_index("caption_id")["source"]
        manifest = manifest.copy()
        for i in np.flatnonzero(repeated.to_numpy()):
            if manifest.at[i, "load_error"] is None:
                manifest.at[i, "load_error"] = (
                    f"caption_id {ids.iat[i]!r} repeats {first_source[ids.iat[i]]}; caption ids must be unique "
                    "across sources (give the sources distinct \"id_prefix\" values)"
                )
    return manifest


def load_corpus(sources: list[dict]) -> pd.DataFrame:
    """Concatenate the manifests of several sources.

    Each source is ``{"json": path, "image_root": path, "lang": "en"|"zh", "id_prefix": str (optional),
    "extra_image_roots": [paths] (optional)}`` for a Karpathy file, or ``{"csv": path, "image_root": path,
    "lang": ..., ...}`` for a CSV manifest (:func:`load_csv_manifest`). A caption id that repeats one of an earlier
    source is quarantined (``load_error``); give corpora with overlapping sentence ids distinct ``id_prefix`` values.
    """
    if not sources:
        raise ConfigError("load_corpus: no sources given; expected a list of {json, image_root, lang} dicts.")
    frames = []
    for k, source in enumerate(sources):
        if not isinstance(source, dict):
            raise ConfigError(f"load_corpus: sources[{k}] is {source!r}; expected a dict with json, image_root, lang.")
        kind = "csv" if "csv" in source else "json"
        missing = [key for key in (kind, "image_root", "lang") if key not in source]
        if missing:
            raise ConfigError(f"load_corpus: sources[{k}] lacks {missing}; each source needs json (or csv), image_root, lang.")
        unknown = sorted(set(source) - {kind, "image_root", "lang", "id_prefix", "extra_image_roots"})
        if unknown:
            raise ConfigError(f"load_corpus: sources[{k}] has unknown key(s) {unknown}; allowed: {kind}, image_root, "
                              "lang, id_prefix, extra_image_roots.")
        loader = load_csv_manifest if kind == "csv" else load_karpathy
        frames.append(loader(Path(source[kind]), Path(source["image_root"]), source["lang"],
                             source.get("id_prefix", ""), source.get("extra_image_roots") or ()))
    return _quarantine_repeated_caption_ids(pd.concat(frames, ignore_index=True))


#: Columns of a CSV manifest (:func:`load_csv_manifest`); ``caption_id`` and ``lang`` are optional.
CSV_COLUMNS = ("image_id", "image", "caption", "split")


def load_csv_manifest(
    csv_path: Path,
    image_root: Path,
    lang: str = "en",
    id_prefix: str = "",
    extra_image_roots: Sequence[str | Path] = (),
) -> pd.DataFrame:
    """Read a CSV corpus (header ``image_id,image,caption,split`` and optionally ``caption_id``, ``lang``), one
    caption per line, ``image`` relative to ``image_root``. A line with a missing field or an unknown split or
    language gets a ``load_error`` (quarantined by validation); a missing file, non-UTF-8 text or a header without
    the required columns stops the load."""
    csv_path, image_root = Path(csv_path), Path(image_root)
    lines = _read_text_lines(csv_path, "a CSV corpus with a header line")
    table = list(csv.reader(lines))
    header = [h.strip() for h in table[0]] if table else []
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
        raise DatasetFormatError(f"{csv_path}: line 1 lacks column(s) {missing}; expected a header with "
                                 f"{list(CSV_COLUMNS)} (optional: caption_id, lang).")
    if not image_root.is_dir():
        raise DatasetFormatError(f"{image_root}: image folder for {csv_path.name} not found; fix image_root.")
    roots = encode_roots(image_roots_for(image_root, extra_image_roots))
    col = {name: header.index(name) for name in header}
    rows = _Rows()
    for number, cells in enumerate(table[1:], start=2):
        if not any(cell.strip() for cell in cells):
            continue
        get = {name: (cells[i].strip() if i < len(cells) else "") for name, i in col.items()}
        row_lang = get.get("lang") or lang
        problems = [f"line {number}: column {name} is empty; expected a value" for name in CSV_COLUMNS if not get[name]]
        if get["split"] and get["split"] not in KARPATHY_SPLITS:
            problems.append(_problem(f"line {number}: split", f"one of {list(KARPATHY_SPLITS)}", get["split"]))
        if row_lang not in LANGS:
            problems.append(_problem(f"line {number}: lang", f"one of {list(LANGS)}", row_lang))
        where = f"{csv_path.name}:{number}"
        rows.add(image_id=f"{id_prefix}{get['image_id']}" if get["image_id"] else None,
                 image_path=os.path.join(os.path.abspath(image_root), get["image"]) if get["image"] else None,
                 caption=get["caption"] or None,
                 caption_id=f"{row_lang}:{id_prefix}{get.get('caption_id') or where}",
                 split=KARPATHY_SPLITS.get(get["split"]), lang=row_lang if row_lang in LANGS else None,
                 source=where, entry=where, image_root=roots, load_error="; ".join(problems) or None)
    manifest = rows.frame()
    if manifest.empty:
        raise DatasetFormatError(f"{csv_path}: no rows below the header; expected one caption per line.")
    return manifest


#: Columns of a classification image table (zero-shot sets), in order.
IMAGE_TABLE_COLUMNS = ("image_path", "label", "wnid", "image_root", "entry", "load_error")


def _image_table(rows: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame([{col: row.get(col) for col in IMAGE_TABLE_COLUMNS} for row in rows],
                         columns=list(IMAGE_TABLE_COLUMNS))
    table["label"] = table["label"].astype(object)
    return table


def _image_entries(folder: Path) -> list[Path]:
    """Every non-hidden entry of ``folder`` with an image suffix, sorted: regular files, but also links, FIFOs or
    folders that carry an image name, so that validation quarantines them instead of their being skipped silently."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def load_imagefolder(
    root: Path, wnids_file: Path | None = None, extra_image_roots: Sequence[str | Path] = ()
) -> tuple[pd.DataFrame, list[str]]:
    """Read an ImageNet-style folder ``root/<wnid>/<image>`` into ``(table, wnids)``.

    ``table`` has the columns :data:`IMAGE_TABLE_COLUMNS`: ``image_path`` (absolute str), ``label`` (int class
    index), ``wnid``, the allowed ``image_root`` (``root`` resolved, plus ``extra_image_roots``), ``entry`` and
    ``load_error`` (always None here; containment and decoding are checked by validation). Rows are sorted by label
    then file name. Class ``i`` is ``wnids[i]``: the sorted sub-folder names, or the lines of ``wnids_file`` when
    given (then every sub-folder must be listed there, and listed classes may lack a folder). Entries whose suffix
    is not an image suffix are ignored.
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
    roots = encode_roots(image_roots_for(root, extra_image_roots))
    index = {wnid: i for i, wnid in enumerate(wnids)}
    rows = [
        {"image_path": os.path.abspath(path), "label": index[wnid], "wnid": wnid, "image_root": roots,
         "entry": f"{root.name}/{wnid}/{path.name}"}
        for wnid in folders
        for path in _image_entries(root / wnid)
    ]
    if not rows:
        raise DatasetFormatError(
            f"{root}: the class folders hold no image files (suffixes {list(IMAGE_SUFFIXES)}); expected "
            "root/<wnid>/<image>. Check that the images were extracted."
        )
    return _image_table(rows), wnids


#: The value of a language parameter meaning "the corpus's own language(s)".
AUTO = "auto"


def corpus_languages(manifest: pd.DataFrame, split: str | None = None) -> list[str]:
    """The caption languages of ``manifest`` (of ``split`` when given), most captions first (ties in
    :data:`LANGS` order). The first is the corpus's primary language: what training, the merge sweep and evaluation
    use when their language is ``"auto"`` (e.g. ``zh`` for COCO-CN, ``en`` for Flickr30k or the default data)."""
    rows = manifest if split is None else manifest[manifest["split"] == split]
    counts = rows["lang"].value_counts()
    langs = [lang for lang in counts.index if isinstance(lang, str)]
    order = {lang: k for k, lang in enumerate(LANGS)}
    return sorted(langs, key=lambda lang: (-int(counts[lang]), order.get(lang, len(order))))


def resolve_lang(value: str, manifest: pd.DataFrame, split: str | None = None, what: str = "lang") -> str:
    """``value``, or the corpus's primary language when it is ``"auto"``; a language absent from the corpus is a
    :class:`ConfigError` naming ``what`` and the languages there are."""
    langs = corpus_languages(manifest, split)
    if not langs:
        raise DatasetFormatError(f"the manifest has no captions{f' in split {split!r}' if split else ''}; "
                                 "check the corpus and the validation quarantine.")
    if value == AUTO:
        return langs[0]
    if value not in langs:
        raise ConfigError(f"{what}={value!r}, but the corpus{f' split {split!r}' if split else ''} has captions in "
                          f"{langs} only; set {what} to one of them, or to 'auto' (the corpus's primary language).")
    return value


def resolve_langs(value: str | Sequence[str], manifest: pd.DataFrame, split: str | None = None,
                  exclude: Sequence[str] = ()) -> list[str]:
    """A list of languages, or with ``"auto"`` every language of the corpus (split) except ``exclude``."""
    if value == AUTO:
        return [lang for lang in corpus_languages(manifest, split) if lang not in exclude]
    if isinstance(value, str):
        raise ConfigError(f"expected a list of languages or 'auto', got {value!r}.")
    return list(value)


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
#: The MS-COCO 2014 image folders.
COCO_FOLDERS = ("train2014", "val2014")


def _read_text_lines(path: Path, what: str) -> list[str]:
    """The lines of a UTF-8 text file (a byte-order mark is dropped), or a DatasetFormatError."""
    if not path.is_file():
        raise DatasetFormatError(f"{path}: file not found; expected {what}. Check the path in the data catalog.")
    try:
        # "\n" only: str.splitlines() would also break lines at U+2028/U+0085 inside a caption.
        return [line.removesuffix("\r") for line in path.read_text(encoding="utf-8-sig").split("\n")]
    except UnicodeDecodeError as exc:
        raise DatasetFormatError(f"{path}: not UTF-8 text ({exc}); expected {what}. Re-save it as UTF-8.") from exc


def _coco_id(text: str) -> tuple[str, str] | None:
    """``(image_id, folder)`` of a COCO id (``.jpg`` suffix tolerated), or None when it is not one."""
    image_id = text[:-4] if text.lower().endswith(".jpg") else text
    match = _COCO_ID.match(image_id)
    return None if match is None else (image_id, match.group(1))


_NOT_COCO_ID = ("is not an MS-COCO 2014 image id; expected e.g. 'COCO_val2014_000000290833' "
                "(COCO_<train2014|val2014>_<12 digits>)")


def _image_folders(image_roots: str | Path | Mapping[str, str | Path]) -> dict[str, Path]:
    """The ``train2014`` / ``val2014`` image folders of COCO-CN's ``image_roots`` setting."""
    if isinstance(image_roots, Mapping):
        folders = {str(k): Path(v) for k, v in image_roots.items()}
        unknown = sorted(set(folders) - set(COCO_FOLDERS))
        if unknown:
            raise ConfigError(f"load_coco_cn: image_roots has unknown key(s) {unknown}; expected {list(COCO_FOLDERS)}.")
        return folders
    return {name: Path(image_roots) / name for name in COCO_FOLDERS}


def load_coco_cn(
    root: str | Path,
    image_roots: str | Path | Mapping[str, str | Path],
    splits: Sequence[str] = ("train", "val", "test"),
    captions_file: str | Path = COCO_CN_CAPTIONS_FILE,
    split_files: Mapping[str, str | Path] | None = None,
    id_prefix: str = "",
    extra_image_roots: Sequence[str | Path] = (),
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
    ``val2014/`` (each may be a link to the COCO download, as the COCO-CN README suggests) or a mapping
    ``{"train2014": dir, "val2014": dir}``. Images must resolve inside those folders or ``extra_image_roots``.

    ``image_id`` is ``id_prefix + <COCO id>``, ``caption_id`` is ``"zh:" + image_id + "#<n>"`` and
    ``source`` is ``"<file>:<line>"``. Rows follow the order of ``splits``, then the split list, then ``n``.
    Only a missing or non-UTF-8 file raises :class:`DatasetFormatError`. Malformed entries become rows with a
    ``load_error`` (quarantined by validation): a split-list line that is not a COCO id, an image listed twice
    (the later listing; it names the first), a malformed caption line, a repeated caption id, and a listed image
    without any caption. Captions of images in none of the read splits are ignored. Image files are not opened.
    """
    root = Path(root)
    unknown = [s for s in splits if s not in COCO_CN_SPLIT_FILES]
    if unknown or not splits:
        raise ConfigError(f"load_coco_cn: splits={list(splits)}; expected a non-empty subset of {list(COCO_CN_SPLIT_FILES)}.")
    files = {**COCO_CN_SPLIT_FILES, **dict(split_files or {})}
    folders = _image_folders(image_roots)
    roots = encode_roots(resolve_roots([*(p for p in folders.values() if p.is_dir()), *extra_image_roots]))

    def at_root(name: str | Path) -> Path:
        path = Path(name)
        return path if path.is_absolute() else root / path

    rows = _Rows()

    def bad(where: str, load_error: str, **values: object) -> None:
        rows.add(lang="zh", source=where, entry=where, image_root=roots, load_error=load_error, **values)

    # 1. Split lists: image id -> (split, where listed).
    split_of: dict[str, tuple[str, str]] = {}
    ordered: list[tuple[str, str, str, str]] = []  # (split, image_id, folder, where)
    for split in splits:
        path = at_root(files[split])
        lines = _read_text_lines(path, f"the COCO-CN {split} split list (one image id per line)")
        for number, line in enumerate(lines, start=1):
            text, where = line.strip(), f"{path.name}:{number}"
            if not text:
                continue
            parsed = _coco_id(text)
            if parsed is None:
                bad(where, f"line {number}: {_shown(text)} {_NOT_COCO_ID}", split=split)
                continue
            image_id, folder = parsed
            if image_id in split_of:
                other_split, other_where = split_of[image_id]
                bad(where, f"image {image_id} is already listed at {other_where} (split {other_split!r}); expected each "
                    "image in one split", image_id=f"{id_prefix}{image_id}", split=split)
                continue
            split_of[image_id] = (split, where)
            ordered.append((split, image_id, folder, where))

    for folder in sorted({folder for _, _, folder, _ in ordered}):
        if folder not in folders or not folders[folder].is_dir():
            needed = next(image_id for _, image_id, f, _ in ordered if f == folder)
            raise DatasetFormatError(
                f"{folders.get(folder, folder)}: MS-COCO image folder {folder} not found (needed for {needed} and "
                f"others); expected the {folder} images as <id>.jpg. Fix image_roots in the data catalog."
            )

    # 2. Captions of the listed images; malformed and repeated lines are quarantined.
    cap_path = at_root(captions_file)
    captions: dict[str, list[tuple[int, str, str, str | None]]] = {}  # image -> (n, caption, where, error)
    seen: dict[str, str] = {}
    for number, line in enumerate(_read_text_lines(cap_path, "the COCO-CN caption file (<image_id>#<n><TAB><caption> per line)"),
                                  start=1):
        if not line.strip():
            continue
        where = f"{cap_path.name}:{number}"
        key, tab, caption = line.partition("\t")
        image_text, hash_mark, n_text = key.strip().rpartition("#")
        parsed = _coco_id(image_text) if tab and hash_mark and n_text.isdigit() else None
        if parsed is None:
            bad(where, f"line {number}: {_shown(line)} is not '<image_id>#<n><TAB><caption>' with a COCO 2014 image id; "
                "expected e.g. 'COCO_val2014_000000290833#0\\t<Chinese caption>'", caption=caption.strip() or None)
            continue
        image_id = parsed[0]
        if image_id not in split_of:
            continue  # an image of a split that is not read
        error = None
        if key.strip() in seen:
            error = f"caption id {key.strip()!r} repeats {seen[key.strip()]}; expected each <image_id>#<n> once"
        else:
            seen[key.strip()] = where
        captions.setdefault(image_id, []).append((int(n_text), caption.strip(), where, error))

    # 3. Manifest rows; a listed image without a caption is quarantined as its split-list entry.
    for split, image_id, folder, where in ordered:
        image_path = os.path.abspath(folders[folder] / f"{image_id}.jpg")
        common = {"image_id": f"{id_prefix}{image_id}", "image_path": image_path, "split": split, "lang": "zh",
                  "image_root": roots}
        if image_id not in captions:
            rows.add(**common, source=where, entry=where,
                     load_error=f"image {image_id} ({where}) has no caption in {cap_path.name}; expected at least one "
                     f"'{image_id}#0<TAB>...' line")
            continue
        for n, caption, line_where, error in sorted(captions[image_id], key=lambda c: (c[0], c[2])):
            rows.add(**common, caption=caption, caption_id=None if error else f"zh:{id_prefix}{image_id}#{n}",
                     source=line_where, entry=where, load_error=error)
    manifest = rows.frame()
    if manifest.empty:
        raise DatasetFormatError(f"{root}: the split lists {[files[s] for s in splits]} list no images.")
    return manifest


# ---------------------------------------------------------------------------------------------
# ImageNet-1k validation set, flat layout
# ---------------------------------------------------------------------------------------------


def _parse_label(text: str) -> int | None:
    try:
        return int(text.strip())
    except ValueError:
        return None


def _read_flat_labels(labels_file: Path, image_dir: Path, files: list[Path]) -> list[dict]:
    """One ``{path, raw label, line, error}`` per image (and per bad label line) from a plain-integer or
    ``filename,label`` CSV label file. A count mismatch of a plain file (lines cannot be aligned with images) and a
    CSV without the header stop the load; a bad line only quarantines its entry."""
    lines = _read_text_lines(labels_file, "an ImageNet label file")
    if labels_file.suffix.lower() != ".csv":
        while lines and not lines[-1].strip():
            lines.pop()
        if len(lines) != len(files):
            raise DatasetFormatError(
                f"{labels_file}: {len(lines)} labels for {len(files)} image files in {image_dir}; expected one "
                "label per line, line i = the i-th image in file-name order (as ILSVRC2012_validation_ground_truth.txt)."
            )
        out = []
        for k, (f, line) in enumerate(zip(files, lines), start=1):
            raw = _parse_label(line)
            error = None if raw is not None else _problem(f"{labels_file.name} line {k}: label", "one integer", line.strip())
            out.append({"path": f, "raw": raw, "line": k, "error": error})
        return out
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
        where = f"{labels_file.name} line {number}"
        if len(row) <= max(name_col, label_col):
            out.append({"path": None, "raw": None, "line": number,
                        "error": f"{where}: {row}; expected {len(header)} columns {header}"})
            continue
        name, raw = row[name_col].strip(), _parse_label(row[label_col])
        error = None
        if name in seen:
            error = f"{where}: image {name!r} repeats line {seen[name]}; expected one label per image"
        elif name not in by_name:
            error = f"{where}: image {name!r} not found in {image_dir}; expected a file name of that folder"
        elif raw is None:
            error = _problem(f"{where}: label", "one integer class index", row[label_col].strip())
        seen.setdefault(name, number)
        out.append({"path": by_name.get(name, image_dir / name) if name else None, "raw": raw, "line": number,
                    "error": error})
    for name in sorted(set(by_name) - set(seen)):
        out.append({"path": by_name[name], "raw": None, "line": None,
                    "error": f"image {name} has no 'filename,label' row in {labels_file.name}"})
    return sorted(out, key=lambda row: (row["path"].name if row["path"] is not None else "", row["line"] or 0))


def load_imagenet_flat(
    image_dir: str | Path,
    labels_file: str | Path,
    index_base: int = 0,
    label_wnids_file: str | Path | None = None,
    wnids_file: str | Path | None = None,
    extra_image_roots: Sequence[str | Path] = (),
) -> pd.DataFrame:
    """Read a flat ImageNet validation folder plus a label file into a table of :data:`IMAGE_TABLE_COLUMNS`.

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

    Rows are sorted by file name. A missing folder or file, a label count that does not match the images, or a CSV
    without its header raise :class:`DatasetFormatError`; an entry with a non-integer or out-of-range label, an
    unknown or repeated file name, or an image without a label becomes a row with a ``load_error`` (quarantined).
    """
    image_dir, labels_file = Path(image_dir), Path(labels_file)
    if not image_dir.is_dir():
        raise DatasetFormatError(
            f"{image_dir}: ImageNet image folder not found; expected one folder holding the validation images "
            "(ILSVRC2012_val_00000001.JPEG, ...). Fix the path in the data catalog."
        )
    files = _image_entries(image_dir)
    if not files:
        raise DatasetFormatError(f"{image_dir}: no image files (suffixes {list(IMAGE_SUFFIXES)}); check that the images were extracted.")
    if index_base not in (0, 1):
        raise ConfigError(f"load_imagenet_flat: index_base={index_base!r}; expected 0 or 1.")
    labelled = _read_flat_labels(labels_file, image_dir, files)
    label_wnids = load_lines(label_wnids_file) if label_wnids_file is not None else None
    target = load_lines(wnids_file) if wnids_file is not None else (sorted(label_wnids) if label_wnids else None)
    index = {w: i for i, w in enumerate(target)} if target is not None else None
    roots = encode_roots(image_roots_for(image_dir, extra_image_roots))
    rows = []
    for item in labelled:
        raw, error, wnid, label = item["raw"], item["error"], None, None
        where = f"{labels_file.name} line {item['line']}"
        if error is None:
            label = raw - index_base
            n_classes = len(label_wnids) if label_wnids is not None else (len(target) if target is not None else None)
            if label < 0 or (n_classes is not None and label >= n_classes):
                valid = f"{index_base}..{index_base + n_classes - 1}" if n_classes is not None else f">= {index_base}"
                error = f"{where}: label {raw} is out of range; expected {valid} (index_base={index_base})"
            elif label_wnids is not None:
                wnid = label_wnids[label]
                if wnid not in index:
                    error = f"{where}: class {wnid} (label {raw}) is not listed in {wnids_file}"
                else:
                    label = index[wnid]
            elif target is not None:
                wnid = target[label]
        path = item["path"]
        rows.append({"image_path": os.path.abspath(path) if path is not None else None,
                     "label": None if error else label, "wnid": None if error else wnid, "image_root": roots,
                     "entry": f"{image_dir.name}/{path.name}" if path is not None else where, "load_error": error})
    return _image_table(rows)
