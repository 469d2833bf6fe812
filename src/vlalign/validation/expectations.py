"""Great Expectations (1.x) suite for manifest tables (docs/INTERFACES.md §1).

:func:`validate_manifest` adds computed helper columns to a copy of the manifest, runs one GX
expectation per rule through an ephemeral context (pandas data source, dataframe asset, batch
definition, suite, validation definition, checkpoint), maps each expectation's unexpected rows
back to manifest rows, and splits the manifest into clean and quarantined rows
(:mod:`vlalign.validation.quarantine`). With ``data_docs_dir`` the checkpoint also writes
Data Docs HTML there.

Expectations (names as they appear in ``failed_expectations`` and in the report):

===============================  ====================================================================
``entry_well_formed``            the loader read the entry without a fault (``load_error`` is null:
                                 no missing or wrong-typed field, no repeated id); a row that fails it
                                 is quarantined for that reason only, and its image is never opened
``image_id_not_null``            ``image_id`` is present (likewise ``image_path``, ``caption``,
                                 ``split``, ``lang``: ``<column>_not_null``)
``split_known``                  ``split`` is train / val / test
``lang_known``                   ``lang`` is en / zh
``image_id_unique_in_split``     within a split, an image id names one image file: rows whose file
                                 differs from the first file seen for that (split, image_id) fail
``image_in_one_split``           an image (same id or same resolved file) is in one split only; rows in
                                 a less held-out split than another copy fail (test > val > train), so
                                 evaluation splits stay intact and training never sees their images
``caption_min_words_en``         English captions have at least ``min_words_en`` words
``caption_min_han_chars_zh``     Chinese captions have at least ``min_chars_zh`` Han characters
``caption_no_bad_characters``    no U+FFFD replacement character and no control character (Unicode Cc)
``image_inside_root``            the image path resolves (symlinks followed, ``..`` collapsed) inside the
                                 row's allowed image roots (``image_root``); otherwise it is never opened
``image_regular_file``           the contained path is a regular file, not a FIFO, device or folder
``image_exists``                 the image file exists
``image_max_pixels``             its header declares at most ``max_image_pixels`` pixels (checked before
                                 any pixel is decoded, and before Pillow's own decompression-bomb check)
``image_decodes``                PIL can verify and fully load it (decompression-bomb guard on)
``image_min_side``               width and height are at least ``min_image_size`` pixels
===============================  ====================================================================

Each rule checks one thing: a row with a missing image fails ``image_exists`` only (its decode and
size columns are null, which GX map expectations skip), a null caption fails ``caption_not_null`` only, and an
image outside its roots fails ``image_inside_root`` only (nothing after it looks at the file).

The report counts what came in and where it went, so nothing is lost without a trace: ``counts.rows`` (input =
clean + quarantined) and ``counts.entries`` (an entry is one image record of the source file: input = clean +
partly quarantined + quarantined).
"""

from __future__ import annotations

import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from PIL import Image

from vlalign.data.images import DEFAULT_MAX_PIXELS, decode_roots, inspect_image
from vlalign.errors import ConfigError, DatasetFormatError, ValidationFailedError
from vlalign.validation.quarantine import ValidationResult, enforce_threshold, split_rows

__all__ = [
    "ValidationConfig",
    "ValidationResult",
    "add_helper_columns",
    "enforce_threshold",
    "expectation_names",
    "validate_manifest",
]

#: Manifest columns that validation reads; all must be present.
REQUIRED_COLUMNS = ("image_id", "image_path", "caption", "caption_id", "split", "lang", "source", "image_root")
#: Optional manifest columns and the value a missing one takes (``entry`` defaults to ``source``).
OPTIONAL_COLUMNS = ("entry", "load_error")
#: Columns that must not be null (one expectation each).
NOT_NULL_COLUMNS = ("image_id", "image_path", "caption", "split", "lang")
#: How held-out each split is; an image shared by splits is kept only in the most held-out one.
SPLIT_PRIORITY = {"train": 0, "val": 1, "test": 2}
LANGS = ("en", "zh")
#: U+FFFD (decoding failure) and the Unicode control characters (category Cc: C0, DEL, C1).
BAD_CHARACTERS_REGEX = r"[\x00-\x1f\x7f-\x9f\ufffd]"
#: A "word" is a whitespace-separated token with at least one letter or digit.
_WORD_REGEX = r"\S*[^\W_]\S*"
#: CJK unified ideographs (basic block, extension A, compatibility, extension B-F).
_HAN_REGEX = r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef]"
#: Name of the Data Docs site vlalign adds (the ephemeral context already has ``local_site``).
DATA_DOCS_SITE = "vlalign_data_docs"
_ROW = "row_index"  # helper column: position of the row in the manifest, used to map failures back


@dataclass
class ValidationConfig:
    """Thresholds of the manifest expectations."""

    min_words_en: int = 3  # minimum words (whitespace-separated tokens with a letter/digit) in an English caption
    min_chars_zh: int = 4  # minimum Han characters in a Chinese caption; Chinese has no spaces, so words
    #                        cannot be counted without a segmenter, and 4 characters (e.g. 红色圆形) carry
    #                        about what 3 English words do
    min_image_size: int = 32  # minimum image width and height, in pixels
    max_rejected_fraction: float = 0.05  # enforce_threshold fails when more than this fraction of rows is quarantined
    check_images: bool = True  # open every image (exists / decodes / size); False skips the file expectations
    #                          (containment is always checked: it never opens anything)
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # images whose header declares more pixels are quarantined undecoded
    image_workers: int = 4  # threads that open images (each unique file is opened once)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first field out of range."""
        checks = [
            ("min_words_en", self.min_words_en >= 0, "an integer >= 0"),
            ("min_chars_zh", self.min_chars_zh >= 0, "an integer >= 0"),
            ("min_image_size", self.min_image_size >= 1, "an integer >= 1"),
            ("max_rejected_fraction", 0.0 <= self.max_rejected_fraction <= 1.0, "a fraction in [0, 1]"),
            ("image_workers", self.image_workers >= 1, "an integer >= 1"),
            ("max_image_pixels", self.max_image_pixels >= 1, "an integer >= 1"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"ValidationConfig.{name}={getattr(self, name)!r}: expected {expected}.")


@dataclass(frozen=True)
class _Rule:
    """One expectation: its name, the GX expectation, and the per-row explanation of a failure."""

    name: str  # name used in failed_expectations, the report and the expectation's meta
    expectation: object  # a great_expectations.expectations.Expectation over one (helper) column
    explain: Callable[[pd.Series], str]  # helper-frame row -> human sentence saying why it failed


def _rules(config: ValidationConfig) -> list[_Rule]:
    import great_expectations.expectations as gxe

    def gx(cls, name: str, notes: str, **kwargs):
        return cls(meta={"vlalign_name": name}, notes=notes, **kwargs)

    rules = [
        _Rule(
            "entry_well_formed",
            gx(gxe.ExpectColumnValuesToBeNull, "entry_well_formed",
               "The loader read the entry without a fault (no missing or wrong-typed field, no repeated id).",
               column="load_error"),
            lambda row: f"malformed entry: {row['load_error']}",
        ),
    ]
    rules += [
        _Rule(
            f"{col}_not_null",
            gx(gxe.ExpectColumnValuesToNotBeNull, f"{col}_not_null", f"Every row has a {col}.", column=col),
            lambda row, col=col: f"{col} is missing",
        )
        for col in NOT_NULL_COLUMNS
    ]
    rules += [
        _Rule(
            "split_known",
            gx(gxe.ExpectColumnValuesToBeInSet, "split_known", "split is train, val or test.",
               column="split", value_set=list(SPLIT_PRIORITY)),
            lambda row: f"split {row['split']!r} is not one of {list(SPLIT_PRIORITY)}",
        ),
        _Rule(
            "lang_known",
            gx(gxe.ExpectColumnValuesToBeInSet, "lang_known", "lang is en or zh.",
               column="lang", value_set=list(LANGS)),
            lambda row: f"lang {row['lang']!r} is not one of {list(LANGS)}",
        ),
        _Rule(
            "image_id_unique_in_split",
            gx(gxe.ExpectColumnValuesToBeInSet, "image_id_unique_in_split",
               "Within a split an image id names one image file; later files reusing the id are rejected.",
               column="earlier_files_with_same_id", value_set=[0]),
            lambda row: (
                f"image_id {row['image_id']!r} in split {row['split']!r} already names another image file "
                f"({row['first_file_with_same_id']}); this row's file is {row['image_path']}"
            ),
        ),
        _Rule(
            "image_in_one_split",
            gx(gxe.ExpectColumnValuesToBeInSet, "image_in_one_split",
               "An image is in one split; copies in a less held-out split (test > val > train) are rejected.",
               column="held_out_splits_with_image", value_set=[0]),
            lambda row: (
                f"image {row['image_path']} (image_id {row['image_id']!r}) is also in split "
                f"{row['most_held_out_split']!r}, which takes precedence over {row['split']!r}"
            ),
        ),
        _Rule(
            "caption_min_words_en",
            gx(gxe.ExpectColumnValuesToBeBetween, "caption_min_words_en",
               f"English captions have at least {config.min_words_en} words.",
               column="caption_words_en", min_value=config.min_words_en),
            lambda row: (
                f"English caption has {int(row['caption_words_en'])} words, fewer than {config.min_words_en}"
            ),
        ),
        _Rule(
            "caption_min_han_chars_zh",
            gx(gxe.ExpectColumnValuesToBeBetween, "caption_min_han_chars_zh",
               f"Chinese captions have at least {config.min_chars_zh} Han characters.",
               column="caption_han_chars_zh", min_value=config.min_chars_zh),
            lambda row: (
                f"Chinese caption has {int(row['caption_han_chars_zh'])} Han characters, "
                f"fewer than {config.min_chars_zh}"
            ),
        ),
        _Rule(
            "caption_no_bad_characters",
            gx(gxe.ExpectColumnValuesToNotMatchRegex, "caption_no_bad_characters",
               "Captions contain no U+FFFD replacement character and no control character.",
               column="caption", regex=BAD_CHARACTERS_REGEX),
            lambda row: "caption contains " + ", ".join(
                sorted({f"U+{ord(ch):04X}" for ch in re.findall(BAD_CHARACTERS_REGEX, row["caption"])})
            ),
        ),
    ]
    rules.append(
        _Rule(
            "image_inside_root",
            gx(gxe.ExpectColumnValuesToBeInSet, "image_inside_root",
               "The image path resolves inside the corpus's declared image roots; others are never opened.",
               column="image_inside_root", value_set=[True]),
            lambda row: str(row["image_problem"]),
        )
    )
    if config.check_images:
        rules += [
            _Rule(
                "image_regular_file",
                gx(gxe.ExpectColumnValuesToBeInSet, "image_regular_file",
                   "The image is a regular file (not a FIFO, device or folder).",
                   column="image_regular_file", value_set=[True]),
                lambda row: str(row["image_problem"]),
            ),
            _Rule(
                "image_exists",
                gx(gxe.ExpectColumnValuesToBeInSet, "image_exists", "The image file exists.",
                   column="image_exists", value_set=[True]),
                lambda row: f"image file {row['image_path']} does not exist",
            ),
            _Rule(
                "image_max_pixels",
                gx(gxe.ExpectColumnValuesToBeBetween, "image_max_pixels",
                   f"Images declare at most {config.max_image_pixels:,} pixels (checked before decoding).",
                   column="image_pixels", max_value=config.max_image_pixels),
                lambda row: (
                    f"image {row['image_path']} is {int(row['image_width'])}x{int(row['image_height'])} = "
                    f"{int(row['image_pixels']):,} pixels, more than max_image_pixels={config.max_image_pixels:,}; "
                    "it was not decoded"
                ),
            ),
            _Rule(
                "image_decodes",
                gx(gxe.ExpectColumnValuesToBeInSet, "image_decodes", "PIL can verify and load the image.",
                   column="image_decodes", value_set=[True]),
                lambda row: f"image file {row['image_path']} does not decode ({row['image_error']})",
            ),
            _Rule(
                "image_min_side",
                gx(gxe.ExpectColumnValuesToBeBetween, "image_min_side",
                   f"Images are at least {config.min_image_size} px on each side.",
                   column="image_min_side", min_value=config.min_image_size),
                lambda row: (
                    f"image {row['image_path']} is {int(row['image_width'])}x{int(row['image_height'])} px, "
                    f"smaller than {config.min_image_size} px on a side"
                ),
            ),
        ]
    return rules


def expectation_names(config: ValidationConfig | None = None) -> list[str]:
    """Names of the expectations :func:`validate_manifest` runs under ``config``, in suite order."""
    return [rule.name for rule in _rules(config or ValidationConfig())]


# --------------------------------------------------------------------------------------------
# Helper columns
# --------------------------------------------------------------------------------------------


#: Helper columns of the image checks (``image_<key>`` of :func:`vlalign.data.images.inspect_image`'s result).
IMAGE_COLUMNS = ("image_inside_root", "image_regular_file", "image_exists", "image_decodes", "image_width",
                 "image_height", "image_pixels", "image_error", "image_problem")


def image_columns(paths: pd.Series, roots: pd.Series, skip: pd.Series, config: ValidationConfig) -> pd.DataFrame:
    """Per-row image checks (:data:`IMAGE_COLUMNS`); each distinct (path, roots) pair is inspected once, rows
    where ``skip`` is true are not inspected at all (all null)."""
    keys = list(zip(paths.to_numpy(), roots.to_numpy()))
    todo = list(dict.fromkeys(k for k, s in zip(keys, skip.to_numpy()) if not s))

    def inspect(key: tuple[str, str]) -> dict:
        return inspect_image(key[0], decode_roots(key[1]), config.max_image_pixels, open_files=config.check_images)

    with ThreadPoolExecutor(max_workers=config.image_workers) as pool:
        found = dict(zip(todo, pool.map(inspect, todo)))
    empty = dict.fromkeys(IMAGE_COLUMNS)
    rows = [({f"image_{k}": v for k, v in found[key].items()} if not s else empty) for key, s in zip(keys, skip)]
    table = pd.DataFrame(rows, columns=list(IMAGE_COLUMNS))
    # object columns so that "not checked" stays None (skipped by GX) instead of becoming False / NaN casts
    for col in ("image_inside_root", "image_regular_file", "image_exists", "image_decodes"):
        table[col] = table[col].astype(object)
    for col in ("image_width", "image_height", "image_pixels"):
        table[col] = table[col].astype(float)
    table["image_min_side"] = np.fmin(table["image_width"], table["image_height"]).where(
        table["image_decodes"] == True)  # noqa: E712 - object column of True/False/None
    return table


def _duplicate_id_columns(frame: pd.DataFrame, real_path: pd.Series) -> pd.DataFrame:
    """``earlier_files_with_same_id``: how many other files were seen before this row's file under the
    same (split, image_id); 0 for the first file. ``first_file_with_same_id``: that first file."""
    keys = pd.DataFrame({"split": frame["split"], "image_id": frame["image_id"], "file": real_path})
    firsts = keys.dropna().drop_duplicates()
    firsts = firsts.assign(
        earlier_files_with_same_id=firsts.groupby(["split", "image_id"], sort=False).cumcount(),
        first_file_with_same_id=firsts.groupby(["split", "image_id"], sort=False)["file"].transform("first"),
    )
    merged = keys.merge(firsts, on=["split", "image_id", "file"], how="left")
    return merged[["earlier_files_with_same_id", "first_file_with_same_id"]]


def _split_conflict_columns(frame: pd.DataFrame, real_path: pd.Series) -> pd.DataFrame:
    """``held_out_splits_with_image``: number of more held-out splits that also hold this row's image
    (matched by image_id or by resolved file); null for unknown splits. ``most_held_out_split``: the top one."""
    rank = frame["split"].map(SPLIT_PRIORITY)  # NaN for unknown / null splits
    count = pd.Series(0.0, index=frame.index)
    for level in SPLIT_PRIORITY.values():
        present = pd.Series(False, index=frame.index)
        for key in (frame["image_id"], real_path):
            in_level = (rank == level).groupby(key).transform("any")  # NaN where the key is null
            present |= in_level.astype(object).fillna(False).astype(bool)
        count += (present & (rank < level)).astype(float)
    count[rank.isna()] = np.nan
    top = np.fmax(
        rank.groupby(frame["image_id"]).transform("max").to_numpy(dtype=float),
        rank.groupby(real_path).transform("max").to_numpy(dtype=float),
    )
    names = {level: split for split, level in SPLIT_PRIORITY.items()}
    return pd.DataFrame(
        {
            "held_out_splits_with_image": count,
            "most_held_out_split": [None if np.isnan(t) else names[int(t)] for t in top],
        },
        index=frame.index,
    )


def _caption_columns(frame: pd.DataFrame) -> pd.DataFrame:
    caption = frame["caption"].astype(object)  # keeps the .str accessor usable when every caption is null
    words = caption.str.count(_WORD_REGEX).astype(float)
    han = caption.str.count(_HAN_REGEX).astype(float)
    return pd.DataFrame(
        {
            "caption_words_en": words.where(frame["lang"] == "en"),
            "caption_han_chars_zh": han.where(frame["lang"] == "zh"),
        }
    )


def _check_input(manifest: pd.DataFrame) -> None:
    if not isinstance(manifest, pd.DataFrame):
        raise DatasetFormatError(
            f"validate_manifest: got {type(manifest).__name__}; expected a pandas DataFrame manifest."
        )
    if manifest.empty:
        raise DatasetFormatError(
            "validate_manifest: the manifest has no rows; expected at least one image-caption pair. "
            "Check the loader's input files."
        )
    missing = [col for col in REQUIRED_COLUMNS if col not in manifest.columns]
    if missing:
        raise DatasetFormatError(
            f"manifest lacks columns {missing}; expected the manifest columns {list(REQUIRED_COLUMNS)} "
            "(docs/INTERFACES.md §1). Build it with vlalign.data.formats.load_corpus."
        )
    for col in NOT_NULL_COLUMNS:
        values = manifest[col]
        if "load_error" in manifest.columns:
            values = values.where(manifest["load_error"].isna())
        wrong = values.notna() & ~values.map(lambda v: isinstance(v, str))
        if wrong.any():
            i = int(np.flatnonzero(wrong.to_numpy())[0])
            raise DatasetFormatError(
                f"manifest row {i} ({manifest['source'].iloc[i]}): column {col} holds "
                f"{type(values.iloc[i]).__name__} {values.iloc[i]!r}; expected str ({int(wrong.sum())} such rows). "
                "Convert the column to str (docs/INTERFACES.md §1)."
            )


def with_optional_columns(manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest with :data:`OPTIONAL_COLUMNS` added when absent (``entry`` = ``source``, no load errors)."""
    manifest = manifest.reset_index(drop=True)
    if "entry" not in manifest.columns:
        manifest = manifest.assign(entry=manifest["source"])
    if "load_error" not in manifest.columns:
        manifest = manifest.assign(load_error=pd.Series([None] * len(manifest), dtype=object))
    return manifest


def add_helper_columns(manifest: pd.DataFrame, config: ValidationConfig) -> pd.DataFrame:
    """Return a copy of ``manifest`` (reset to positions 0..n-1) with the computed columns the suite checks.

    Rows with a ``load_error`` get null helper columns (null values are skipped by GX map expectations), so they
    fail ``entry_well_formed`` alone and their image is never looked at.
    """
    frame = manifest.reset_index(drop=True).copy()
    frame[_ROW] = np.arange(len(frame))
    malformed = frame["load_error"].notna()
    unique_paths = pd.unique(frame["image_path"].dropna())
    real = {p: os.path.realpath(p) for p in unique_paths}
    real_path = frame["image_path"].map(real).where(~malformed)
    usable = frame.where(~malformed)
    parts = [
        _duplicate_id_columns(usable, real_path),
        _split_conflict_columns(usable, real_path),
        _caption_columns(usable),
        image_columns(frame["image_path"], frame["image_root"], malformed | frame["image_path"].isna(), config),
    ]
    return pd.concat([frame] + parts, axis=1)


def accounting(manifest: pd.DataFrame, quarantined_rows: set[int]) -> dict[str, dict[str, int]]:
    """What came in and where it went: ``rows`` (input = clean + quarantined) and ``entries`` (one per image record
    of a source file; input = clean + partly_quarantined + quarantined), so nothing is lost without a trace."""
    bad = np.zeros(len(manifest), dtype=bool)
    bad[sorted(quarantined_rows)] = True
    per_entry = pd.Series(bad, index=manifest.index).groupby(manifest["entry"].to_numpy(), sort=False).agg(["all", "any"])
    rows = {"input": int(len(manifest)), "clean": int((~bad).sum()), "quarantined": int(bad.sum())}
    entries = {
        "input": int(len(per_entry)),
        "clean": int((~per_entry["any"]).sum()),
        "partly_quarantined": int((per_entry["any"] & ~per_entry["all"]).sum()),
        "quarantined": int(per_entry["all"].sum()),
    }
    return {"rows": rows, "entries": entries}


def summary_lines(report: dict) -> list[str]:
    """A short human summary of a validation report (printed by the pipeline, logged to MLflow)."""
    rows, entries = report["counts"]["rows"], report["counts"]["entries"]
    lines = [
        f"validation: {rows['input']} rows = {rows['clean']} clean + {rows['quarantined']} quarantined; "
        f"{entries['input']} entries = {entries['clean']} clean + {entries['partly_quarantined']} partly "
        f"quarantined + {entries['quarantined']} quarantined",
    ]
    lines += [f"  {name}: {info['unexpected_count']} rows" for name, info in report["expectations"].items()
              if info["unexpected_count"]]
    return lines


# --------------------------------------------------------------------------------------------
# Running the suite
# --------------------------------------------------------------------------------------------


def _run_checkpoint(frame: pd.DataFrame, rules: list[_Rule], suite_name: str, data_docs_dir: Path | None):
    """Run the suite over ``frame`` in an ephemeral GX context; return the suite validation result."""
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    actions = []
    if data_docs_dir is not None:
        Path(data_docs_dir).mkdir(parents=True, exist_ok=True)
        context.add_data_docs_site(
            DATA_DOCS_SITE,
            {
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(Path(data_docs_dir).absolute()),
                },
            },
        )
        actions.append(UpdateDataDocsAction(name="update_data_docs", site_names=[DATA_DOCS_SITE]))
    batch_definition = (
        context.data_sources.add_pandas("vlalign_manifest_source")
        .add_dataframe_asset("manifest")
        .add_batch_definition_whole_dataframe("whole_manifest")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=suite_name))
    for rule in rules:
        suite.add_expectation(rule.expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(data=batch_definition, suite=suite, name=f"{suite_name}_validation")
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=f"{suite_name}_checkpoint",
            validation_definitions=[definition],
            actions=actions,
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [_ROW]},
        )
    )
    checkpoint_result = checkpoint.run(batch_parameters={"dataframe": frame})
    (suite_result,) = checkpoint_result.run_results.values()
    return suite_result


def _run_suite(
    table: pd.DataFrame, frame: pd.DataFrame, rules: list[_Rule], config: ValidationConfig,
    data_docs_dir: Path | None, suite_name: str,
) -> ValidationResult:
    """Run ``rules`` over the helper ``frame`` of ``table``, map each failure back to its row, and split ``table``
    into clean and quarantined rows with a report (see :func:`validate_manifest`)."""
    by_name = {rule.name: rule for rule in rules}
    suite_result = _run_checkpoint(frame, rules, suite_name, data_docs_dir)
    malformed = frame["load_error"].notna().to_numpy()

    failed: dict[int, list[str]] = {}
    reasons: dict[int, list[str]] = {}
    expectations: dict[str, dict] = {}
    for result in suite_result.results:
        name = result.expectation_config.meta["vlalign_name"]
        info = result.result or {}
        if result.exception_info.get("raised_exception"):
            raise ValidationFailedError(
                f"expectation {name} could not be evaluated: {result.exception_info.get('exception_message')}. "
                "This is a bug in the suite or an unexpected column type in the table; please report it."
            )
        rows = [int(entry[_ROW]) for entry in info.get("unexpected_index_list", [])]
        if len(rows) != int(info.get("unexpected_count", 0)):
            raise ValidationFailedError(
                f"expectation {name}: GX reported {info.get('unexpected_count')} unexpected rows but listed "
                f"{len(rows)}; cannot map failures back to rows. Please report this."
            )
        if name != "entry_well_formed":  # a malformed entry is quarantined for that reason alone
            rows = [i for i in rows if not malformed[i]]
        for i in rows:
            failed.setdefault(i, []).append(name)
            reasons.setdefault(i, []).append(by_name[name].explain(frame.iloc[i]))
        expectations[name] = {
            "success": not rows,
            "unexpected_count": len(rows),
            "unexpected_percent": 100.0 * len(rows) / max(1, len(table)),
            "type": result.expectation_config.type,
            "column": result.expectation_config.kwargs.get("column"),
        }
    # keep the report in suite order and the per-row names in suite order
    order = {rule.name: k for k, rule in enumerate(rules)}
    expectations = dict(sorted(expectations.items(), key=lambda item: order[item[0]]))
    for i in failed:
        pairs = sorted(zip(failed[i], reasons[i]), key=lambda pair: order[pair[0]])
        failed[i], reasons[i] = [p[0] for p in pairs], [p[1] for p in pairs]

    clean, quarantine = split_rows(table, failed, reasons)
    n_rows = len(table)
    rejected = len(quarantine) / n_rows if n_rows else 0.0
    index_html = Path(data_docs_dir).absolute() / "index.html" if data_docs_dir is not None else None
    report = {
        "suite_name": suite_name,
        "success": not failed,
        "n_rows": n_rows,
        "n_clean": len(clean),
        "n_quarantined": len(quarantine),
        "rejected_fraction": rejected,
        "max_rejected_fraction": config.max_rejected_fraction,
        "within_threshold": rejected <= config.max_rejected_fraction,
        "counts": accounting(table, set(failed)),
        "expectations": expectations,
        "statistics": {k: (float(v) if v is not None else None) for k, v in suite_result.statistics.items()},
        "data_docs_index": str(index_html) if index_html is not None else None,
    }
    return ValidationResult(clean=clean, quarantine=quarantine, report=report, success=not failed)


def validate_manifest(
    manifest: pd.DataFrame,
    config: ValidationConfig | None = None,
    data_docs_dir: Path | None = None,
    suite_name: str = "vlalign_manifest",
) -> ValidationResult:
    """Validate a manifest with the GX suite and split it into clean and quarantined rows.

    Args:
        manifest: manifest table (docs/INTERFACES.md §1).
        config: thresholds; defaults to :class:`ValidationConfig`.
        data_docs_dir: when given, GX Data Docs HTML (``index.html`` and pages) are written there.
        suite_name: name of the GX expectation suite (shown in Data Docs).

    Returns a :class:`~vlalign.validation.quarantine.ValidationResult`; ``report`` holds, per
    expectation, ``success``, ``unexpected_count``, ``unexpected_percent``, the GX type and column, plus
    ``n_rows``, ``n_clean``, ``n_quarantined``, ``rejected_fraction``, ``counts`` (rows and entries: input =
    clean + quarantined), the GX ``statistics`` and ``data_docs_index``. It never raises for bad rows; use
    :func:`~vlalign.validation.quarantine.enforce_threshold` for that.
    """
    config = config or ValidationConfig()
    config.validate()
    _check_input(manifest)
    manifest = with_optional_columns(manifest)
    return _run_suite(manifest, add_helper_columns(manifest, config), _rules(config), config, data_docs_dir,
                      suite_name)


#: The expectations an image table (a zero-shot classification set) is checked with.
IMAGE_TABLE_RULES = ("entry_well_formed", "image_inside_root", "image_regular_file", "image_exists",
                     "image_max_pixels", "image_decodes")


def validate_image_table(
    table: pd.DataFrame, config: ValidationConfig | None = None, suite_name: str = "vlalign_image_table"
) -> ValidationResult:
    """Validate a classification image table (:data:`vlalign.data.formats.IMAGE_TABLE_COLUMNS`, e.g. a zero-shot
    set) with the entry and image expectations (:data:`IMAGE_TABLE_RULES`); same result shape as
    :func:`validate_manifest`. The clean table's ``label`` column is int."""
    config = config or ValidationConfig()
    config.validate()
    missing = [c for c in ("image_path", "label", "image_root") if c not in table.columns]
    if missing:
        raise DatasetFormatError(f"image table lacks columns {missing}; build it with vlalign.data.formats loaders.")
    table = table.reset_index(drop=True)
    if "entry" not in table.columns:
        table = table.assign(entry=table["image_path"])
    if "load_error" not in table.columns:
        table = table.assign(load_error=pd.Series([None] * len(table), dtype=object))
    frame = table.copy()
    frame[_ROW] = np.arange(len(frame))
    malformed = frame["load_error"].notna()
    frame = pd.concat([frame, image_columns(frame["image_path"], frame["image_root"],
                                            malformed | frame["image_path"].isna(), config)], axis=1)
    rules = [rule for rule in _rules(config) if rule.name in IMAGE_TABLE_RULES]
    result = _run_suite(table, frame, rules, config, None, suite_name)
    result.clean["label"] = result.clean["label"].astype(int)
    return result
