"""Training data that does not fit in memory: WebDataset-style tar shards, streamed with exact mid-epoch resume.

**Writing** (:func:`write_shards`). The clean manifest of one split becomes tar files of bounded size, one sample
per unique image: ``<key>.<ext>`` holds the image file's own bytes (read with
:func:`vlalign.data.images.read_image_bytes`, so containment still holds) and ``<key>.json`` holds
``{"image_id", "captions": {lang: [...]}, "caption_ids": {lang: [...]}, "source"}``. The key is the sample's
*ordinal* (its position in the index) written with :data:`KEY_DIGITS` digits. The bytes are deterministic (sorted
members, mtime 0, uid/gid 0, empty owner names, mode 0644, USTAR headers), so a shard's name carries its SHA-256
(``f"{split}-{k:05d}-{sha256[:16]}.tar"``) and DVC stores each shard once. The index ``shards.json`` is written
last, atomically; shards of an older index are removed only after the new index is in place.

**Reading** (:class:`ShardStream`). An epoch is planned from the index alone (:func:`plan_epoch`): the shards are
permuted by ``(seed, epoch)`` and dealt to ranks, then to the workers of each rank, always to the one holding the
fewest samples so far. Every shard goes to exactly one (rank, worker). A worker reads its shards in plan order,
passes the samples through a shuffle buffer driven by a generator seeded by ``(seed, epoch, rank, worker)`` and
batches them; it drops its last partial batch. Every rank yields the same number of batches,
:func:`steps_in_epoch` (the minimum over ranks), so DDP never waits for a rank that has run dry.

**Exact resume.** The shuffle buffer's draws depend only on how many samples arrive, never on their contents, so
the order in which a worker emits its samples is a pure function of the index and the position
(:func:`worker_order`). Resuming at batch ``k`` of an epoch therefore costs no decoding and no reading of the
shards whose samples were all emitted before ``k``: the worker computes the order, skips the batches it had
produced (:func:`consumed_per_worker`), and reads only the shards that still hold samples it will emit (the
samples in the buffer at the resume point included). The batch sequence from ``set_position(epoch, k)`` equals
the tail of the uninterrupted epoch from batch ``k``.

**How many samples an epoch drops.** With ``W`` ranks, ``N`` workers per rank (``N = max(1, num_workers)``),
batch size ``B`` and ``S`` the largest number of samples in one shard, at most
``(W - 1) * S + W * N * (B - 1)`` samples are left out of an epoch: each worker's last partial batch (``< B``
each) and, on ranks holding more samples than the smallest rank, the surplus (``<= S`` per rank: the greedy deal
keeps ranks within one shard of each other). The shards are re-dealt and the buffers re-seeded every epoch, so
which samples are left out changes from epoch to epoch.

**Use with a DataLoader**::

    stream = ShardStream(index, sample_fn, collate_fn, batch_size, seed=seed, rank=rank, world_size=world,
                         num_workers=4)
    stream.set_position(epoch, start_batch)
    loader = DataLoader(stream, batch_size=None, num_workers=stream.num_workers)   # one new loader per epoch

The DataLoader must keep its defaults ``in_order=True`` and ``persistent_workers=False`` (a persistent worker
keeps the copy of the stream it was started with and never sees ``set_position``). Iterating the stream in the
main process (``num_workers=0`` in the DataLoader, or a plain ``iter(stream)``) yields exactly the sequence that
a DataLoader with ``stream.num_workers`` workers would.
"""

from __future__ import annotations

import array
import hashlib
import heapq
import io
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import torch

from vlalign.data.images import (DEFAULT_MAX_PIXELS, ImageAccessError, declared_size, decode_roots,
                                 read_image_bytes)
from vlalign.errors import ConfigError, DatasetFormatError

#: Format marker of a shard index (``shards.json``).
SHARD_FORMAT = "vlalign-shards-v1"
#: File name of the index beside the shards.
INDEX_NAME = "shards.json"
#: Digits of a sample key (its zero-padded ordinal); fixed, so member names sort in sample order.
KEY_DIGITS = 10
#: Columns a manifest needs for :func:`write_shards`.
SHARD_COLUMNS = ("image_id", "image_path", "caption", "lang", "split", "image_root")

_BLOCK = 512  # tar block
_RECORD = 20 * _BLOCK  # tar record: an archive's length is a multiple of it (as GNU tar and Python's tarfile write)
_SHARD_NAME = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<k>\d{5,})-(?P<sha>[0-9a-f]{16})\.tar$")
_MEMBER = re.compile(r"^(?P<key>\d+)\.(?P<ext>[a-z0-9]+)$")
_EXT = re.compile(r"^[a-z0-9]+$")
_PLAN_TAG = 0x53484152  # seeds the shard permutation: (seed, epoch, tag)
_BUFFER_TAG = 0x42554646  # seeds a worker's shuffle buffer: (seed, epoch, rank, worker, tag)
_DRAW_CHUNK = 1 << 16  # shuffle-buffer draws are made in chunks of this many (part of the stream's definition)


# --------------------------------------------------------------------------------------------------- the index


@dataclass
class ShardInfo:
    """One shard file of an index."""

    name: str  # file name beside the index, content-addressed: f"{split}-{k:05d}-{sha256[:16]}.tar"
    sha256: str  # SHA-256 of the whole file, hex
    n_samples: int  # samples (images) in the shard
    n_bytes: int  # file size in bytes


@dataclass
class ShardIndex:
    """The index file ``shards.json``: which shards make up a split, in order, and what they were made from."""

    split: str  # manifest split the shards hold (train / val / test)
    n_samples: int  # samples over all shards (= unique images of the split)
    langs: list[str]  # caption languages present, sorted
    shards: list[ShardInfo]  # the shards in index order; sample ordinals count through them in this order
    source_fingerprint: str  # SHA-256 of the manifest rows used (image_id, image_path, caption, lang)
    format: str = SHARD_FORMAT  # file format marker
    location: str = field(default="", compare=False)  # folder or fsspec URL the index was read from (not saved)

    def to_dict(self) -> dict[str, Any]:
        """The JSON content of ``shards.json`` (everything but ``location``)."""
        data = asdict(self)
        data.pop("location")
        return data

    def to_json(self) -> str:
        """Deterministic JSON text of the index."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any, where: str, location: str = "") -> ShardIndex:
        """Build and check an index read from ``where`` (named in every error)."""
        fields_ = ("split", "n_samples", "langs", "shards", "source_fingerprint", "format")
        if not isinstance(data, dict) or any(k not in data for k in fields_):
            found = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise DatasetFormatError(f"{where}: found {found}; expected a shard index with the fields {list(fields_)} "
                                     "(written by vlalign.data.shards.write_shards / `vlalign shard`).")
        if data["format"] != SHARD_FORMAT:
            raise DatasetFormatError(f"{where}: format {data['format']!r}; expected {SHARD_FORMAT!r}. Re-write the "
                                     "shards with this version of vlalign.")
        shards = []
        for i, item in enumerate(data["shards"] if isinstance(data["shards"], list) else [None]):
            ok = isinstance(item, dict) and set(item) == {"name", "sha256", "n_samples", "n_bytes"}
            ok = ok and isinstance(item["name"], str) and _SHARD_NAME.match(item["name"]) is not None
            ok = ok and isinstance(item["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", item["sha256"]) is not None
            ok = ok and all(isinstance(item[k], int) and item[k] > 0 for k in ("n_samples", "n_bytes"))
            if not ok:
                raise DatasetFormatError(
                    f"{where}: shards[{i}] is {str(item)[:120]}; expected {{name: '<split>-<k>-<sha16>.tar', "
                    "sha256: 64 hex digits, n_samples > 0, n_bytes > 0}.")
            shards.append(ShardInfo(**item))
        total = sum(s.n_samples for s in shards)
        if total != data["n_samples"] or not shards:
            raise DatasetFormatError(f"{where}: n_samples is {data['n_samples']} but the {len(shards)} shard(s) hold "
                                     f"{total}; the index is damaged, re-write the shards.")
        return cls(split=data["split"], n_samples=data["n_samples"], langs=list(data["langs"]), shards=shards,
                   source_fingerprint=data["source_fingerprint"], format=data["format"], location=location)

    def save(self, path: str | Path) -> Path:
        """Write the index to ``path`` (a ``.json`` file, or a folder to hold ``shards.json``), atomically."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / INDEX_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, self.to_json().encode("utf-8"))
        return path

    @classmethod
    def load(cls, path_or_url: str | Path) -> ShardIndex:
        """Read a ``shards.json`` (or the folder holding it), local or at any fsspec URL (``s3://``, ``gs://``, ...)."""
        text = os.fspath(path_or_url)
        is_url = "://" in text
        if not is_url:
            text = os.path.abspath(text)
        if text.endswith(".json"):
            url, location = text, text.rsplit("/", 1)[0]
        else:
            location = text.rstrip("/") or "/"
            url = f"{location}/{INDEX_NAME}"
        try:
            with _open(url, "rb") as handle:
                raw = handle.read()
        except FileNotFoundError as exc:
            raise DatasetFormatError(f"{url}: shard index not found; write the shards first (`vlalign shard`, or "
                                     "vlalign.data.shards.write_shards), or `dvc pull` them.") from exc
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DatasetFormatError(f"{url}: not a JSON shard index ({exc}); re-write the shards.") from exc
        return cls.from_dict(data, where=url, location=location)

    def shard_url(self, shard: ShardInfo) -> str:
        """Path or URL of ``shard``, beside the index it was read from (or written to)."""
        if not self.location:
            raise ConfigError("this ShardIndex has no location; load it with ShardIndex.load(folder_or_url).")
        return f"{self.location.rstrip('/')}/{shard.name}"

    def shard_starts(self) -> np.ndarray:
        """(S + 1,) int64: the first ordinal of each shard, then ``n_samples``."""
        return np.concatenate([[0], np.cumsum([s.n_samples for s in self.shards])]).astype(np.int64)


def _open(url: str, mode: str):
    """fsspec.open, turning a missing fsspec backend (s3fs, gcsfs, ...) into a ConfigError that says what to install."""
    try:
        return fsspec.open(url, mode)
    except (ImportError, ValueError) as exc:
        if isinstance(exc, ValueError) and "protocol" not in str(exc).lower():
            raise
        raise ConfigError(f"{url}: cannot open this URL ({exc}). Install the fsspec backend of its scheme "
                          "(s3fs for s3://, gcsfs for gs://, adlfs for az://) in the training environment.") from exc


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync, then rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------- writing


def _tar_member(name: str, data: bytes) -> bytes:
    """One tar member with deterministic metadata: header, data, zero padding to the block size."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")  # (512,) bytes
    return header + data + b"\0" * (-len(data) % _BLOCK)


def _archive_size(content: int) -> int:
    """Bytes of a tar file whose members take ``content`` bytes: two zero end blocks, padded to a record."""
    size = content + 2 * _BLOCK
    return size + (-size % _RECORD)


def _tar_end(content: int) -> bytes:
    return b"\0" * (_archive_size(content) - content)


def _key(ordinal: int) -> str:
    return f"{ordinal:0{KEY_DIGITS}d}"


def _shard_problem(row: pd.Series) -> str:
    """How to name a manifest row in an error: its source, else its image id."""
    source = row.get("source")
    return str(source) if isinstance(source, str) and source else f"image_id {row.get('image_id')!r}"


def _select_rows(manifest: pd.DataFrame, split: str) -> pd.DataFrame:
    """The clean rows of ``split``, checked: strings where strings belong, no quarantined row."""
    missing = [c for c in SHARD_COLUMNS if c not in manifest.columns]
    if missing:
        raise DatasetFormatError(f"manifest lacks column(s) {missing}; write_shards needs {list(SHARD_COLUMNS)} "
                                 "(the clean manifest of validation, docs/INTERFACES.md §1).")
    rows = manifest[manifest["split"] == split]
    if rows.empty:
        splits = sorted(str(s) for s in manifest["split"].dropna().unique())
        raise DatasetFormatError(f"the manifest has no rows of split {split!r} (it has {splits}); choose one of those.")
    if "load_error" in rows.columns:
        bad = rows[rows["load_error"].notna()]
        if not bad.empty:
            first = bad.iloc[0]
            raise DatasetFormatError(
                f"{len(bad)} row(s) of split {split!r} carry a load_error (first: {_shard_problem(first)}: "
                f"{first['load_error']}); shard the clean manifest that validation writes, not the raw one.")
    for col in ("image_id", "image_path", "caption", "lang", "image_root"):
        bad = rows[~rows[col].map(lambda v: isinstance(v, str) and bool(v))]
        if not bad.empty:
            first = bad.iloc[0]
            raise DatasetFormatError(f"{_shard_problem(first)}: column {col} is {first[col]!r}; expected a "
                                     "non-empty string. Shard the clean manifest that validation writes.")
    return rows


def _samples(rows: pd.DataFrame) -> tuple[list[dict], str, list[str]]:
    """One record per image (sorted by image_id, captions in manifest order), the rows' fingerprint, the langs."""
    n = len(rows)
    col = {c: rows[c].tolist() if c in rows.columns else [None] * n
           for c in ("image_id", "image_path", "caption", "lang", "image_root", "caption_id", "entry", "source")}
    groups: dict[str, list[int]] = {}
    for i, image_id in enumerate(col["image_id"]):
        groups.setdefault(image_id, []).append(i)
    digest = hashlib.sha256()
    samples = []
    for image_id in sorted(groups):
        positions = groups[image_id]
        paths = list(dict.fromkeys(col["image_path"][i] for i in positions))
        if len(paths) != 1:
            raise DatasetFormatError(f"image_id {image_id!r} names {len(paths)} image files ({paths[:3]}); "
                                     "expected one file per image id. Give the corpora distinct id_prefix values.")
        captions: dict[str, list[str]] = {}
        caption_ids: dict[str, list[str | None]] = {}
        where: list[str] = []
        for i in positions:
            digest.update((json.dumps([image_id, paths[0], col["caption"][i], col["lang"][i]],
                                      ensure_ascii=False) + "\n").encode("utf-8"))
            captions.setdefault(col["lang"][i], []).append(col["caption"][i])
            cid = col["caption_id"][i]
            caption_ids.setdefault(col["lang"][i], []).append(cid if isinstance(cid, str) else None)
            entry = next((v for v in (col["entry"][i], col["source"][i]) if isinstance(v, str) and v), None)
            if entry and entry not in where:
                where.append(entry)
        first = positions[0]
        source = col["source"][first]
        samples.append({"image_id": image_id, "path": paths[0], "roots": decode_roots(col["image_root"][first]),
                        "row": source if isinstance(source, str) and source else f"image_id {image_id!r}",
                        "captions": captions, "caption_ids": caption_ids,
                        "source": "; ".join(where) if where else None})
    return samples, digest.hexdigest(), sorted(set(col["lang"]))


def _image_member(sample: dict, max_pixels: int) -> tuple[str, bytes]:
    """(extension, bytes) of a sample's image file, read under its roots; its header is checked, not decoded."""
    path = sample["path"]
    ext = Path(path).suffix.lower().lstrip(".")
    if not _EXT.match(ext) or ext == "json":
        raise DatasetFormatError(f"{sample['row']}: image {path} has no usable file suffix ({ext!r}); expected e.g. "
                                 ".jpg or .png (the suffix names the member in the shard). Rename the file.")
    try:
        data = read_image_bytes(path, sample["roots"])
    except FileNotFoundError as exc:
        raise DatasetFormatError(f"{sample['row']}: image file {path} does not exist; re-run validation.") from exc
    except ImageAccessError as exc:
        raise DatasetFormatError(f"{sample['row']}: {exc} Re-run validation, which quarantines such rows.") from exc
    try:
        width, height = declared_size(io.BytesIO(data))  # the header only, before Pillow's own bomb check
    except Exception as exc:  # PIL raises many types for bad files
        raise DatasetFormatError(f"{sample['row']}: image {path} is not a readable image ({type(exc).__name__}: "
                                 f"{exc}); re-run validation, which quarantines such rows.") from exc
    if width * height > max_pixels:
        raise DatasetFormatError(f"{sample['row']}: image {path} is {width}x{height} pixels, more than "
                                 f"max_image_pixels={max_pixels:,}; re-run validation with the same limit.")
    return ext, data


class _ShardBuilder:
    """Accumulates one shard's members in memory (at most ``max_bytes``), then writes it content-addressed."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.content = 0  # bytes of members so far
        self.n_samples = 0

    def finish(self, out_dir: Path, split: str, k: int) -> ShardInfo:
        """Write the shard unless an identical file is already there; return its entry."""
        data = b"".join(self.chunks) + _tar_end(self.content)
        sha = hashlib.sha256(data).hexdigest()
        name = f"{split}-{k:05d}-{sha[:16]}.tar"
        path = out_dir / name
        if not (path.is_file() and path.stat().st_size == len(data) and _file_sha256(path) == sha):
            _atomic_write(path, data)
        return ShardInfo(name=name, sha256=sha, n_samples=self.n_samples, n_bytes=len(data))


def write_shards(
    manifest: pd.DataFrame,
    out_dir: str | Path,
    *,
    split: str = "train",
    max_samples: int = 1000,
    max_bytes: int = 256 << 20,
    seed: int = 0,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
) -> ShardIndex:
    """Write the clean manifest rows of ``split`` as tar shards plus ``shards.json`` in ``out_dir``.

    One sample per unique image: ``<key>.<ext>`` (the image file's bytes, read under the row's roots; ``ext`` is
    the file's suffix, lowercased) and ``<key>.json`` (image id, captions and caption ids per language, source).
    Images are sorted by id, then shuffled once with ``seed``; a shard closes at ``max_samples`` samples or when
    the next sample would take it past ``max_bytes`` (a sample that alone exceeds ``max_bytes`` is a ConfigError).
    The writer holds one shard in memory.

    Idempotent: a shard file whose name and SHA-256 already match is left untouched, and so is an identical
    ``shards.json``. The index is written last, atomically; then the shards of the previous index, and
    shard-named files no index lists (left by a killed run), are removed from ``out_dir``.
    """
    if not isinstance(split, str) or not re.fullmatch(r"[A-Za-z0-9_]+", split):
        raise ConfigError(f"write_shards: split={split!r}; expected a name of letters, digits and '_' (e.g. train).")
    if max_samples < 1:
        raise ConfigError(f"write_shards: max_samples={max_samples}; expected at least 1 sample per shard.")
    if max_bytes < 4 * _RECORD:
        raise ConfigError(f"write_shards: max_bytes={max_bytes}; expected at least {4 * _RECORD} bytes per shard.")
    if seed < 0:
        raise ConfigError(f"write_shards: seed={seed}; expected a non-negative integer.")
    rows = _select_rows(manifest, split)
    samples, fingerprint, langs = _samples(rows)
    order = np.random.default_rng(seed).permutation(len(samples))
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)

    def members() -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
        for position in order.tolist():
            sample = samples[position]
            ext, image = _image_member(sample, max_image_pixels)
            meta = {"image_id": sample["image_id"], "captions": sample["captions"],
                    "caption_ids": sample["caption_ids"], "source": sample["source"]}
            yield f"{sample['row']}: image {sample['path']}", [(ext, image), ("json", _meta_bytes(meta))]

    shards = _pack(members(), out_dir, split, max_samples, max_bytes)
    index = ShardIndex(split=split, n_samples=len(samples), langs=langs, shards=shards,
                       source_fingerprint=fingerprint, location=str(out_dir))
    return _publish(index, out_dir)


def _meta_bytes(meta: dict) -> bytes:
    return json.dumps(meta, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _pack(samples: Iterable[tuple[str, list[tuple[str, bytes]]]], out_dir: Path, split: str, max_samples: int,
          max_bytes: int) -> list[ShardInfo]:
    """Write ``(what, [(ext, bytes), ...])`` samples as shards with keys counting from 0, each shard closing at
    ``max_samples`` samples or before it would pass ``max_bytes``; returns their entries in order."""
    shards: list[ShardInfo] = []
    builder = _ShardBuilder()
    for ordinal, (what, parts) in enumerate(samples):
        key = _key(ordinal)
        members = sorted((f"{key}.{ext}", data) for ext, data in parts)  # key order, then extension
        chunk = b"".join(_tar_member(name, data) for name, data in members)
        if _archive_size(len(chunk)) > max_bytes:
            raise ConfigError(f"{what} takes {len(chunk):,} bytes in a shard, more than max_bytes={max_bytes:,}; "
                              "raise max_bytes.")
        if builder.n_samples and (builder.n_samples >= max_samples
                                  or _archive_size(builder.content + len(chunk)) > max_bytes):
            shards.append(builder.finish(out_dir, split, len(shards)))
            builder = _ShardBuilder()
        builder.chunks.append(chunk)
        builder.content += len(chunk)
        builder.n_samples += 1
    if not builder.n_samples and not shards:
        raise DatasetFormatError(f"{out_dir}: no samples to write as shards.")
    shards.append(builder.finish(out_dir, split, len(shards)))
    return shards


def _publish(index: ShardIndex, out_dir: Path) -> ShardIndex:
    """Write ``shards.json`` last (unless identical), then remove the previous index's and stray shard files."""
    index_path = out_dir / INDEX_NAME
    previous = _previous_shard_names(index_path)
    text = index.to_json().encode("utf-8")
    if not (index_path.is_file() and index_path.read_bytes() == text):
        index.save(index_path)
    _remove_stale(out_dir, {s.name for s in index.shards}, previous)
    return index


def mix_shards(sources: Sequence[tuple[ShardIndex, int]], out_dir: str | Path, *, max_samples: int = 1000,
               max_bytes: int = 256 << 20) -> ShardIndex:
    """A stage's training mixture: the samples of several shard sets (each ``repeat`` times: integer weights) as
    one content-addressed shard set in ``out_dir``, with keys renumbered; the stream shuffles shards and samples
    across the sources as within one set. Samples are copied unchanged (image bytes and captions), so an image in
    two sources (real and synthetic captions) is two samples. All sources must hold the same split."""
    sources = [(index, int(repeat)) for index, repeat in sources]
    if not sources or any(repeat < 1 for _, repeat in sources):
        raise ConfigError(f"mix_shards: {[(i.location, r) for i, r in sources]}; expected at least one shard set, each "
                          "with an integer weight >= 1 (how many times its samples enter the mixture).")
    splits = sorted({index.split for index, _ in sources})
    if len(splits) != 1:
        raise ConfigError(f"mix_shards: the sources hold different splits {splits}; mix shard sets of one split.")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    for index, repeat in sources:
        digest.update(json.dumps([index.source_fingerprint, [s.sha256 for s in index.shards], repeat]).encode("utf-8"))

    def members() -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
        for index, repeat in sources:
            for _ in range(repeat):
                starts = index.shard_starts()
                for k, shard in enumerate(index.shards):
                    for sample in iter_shard(index.shard_url(shard), int(starts[k]), shard.n_samples):
                        yield (f"{index.location} sample {sample.key}",
                               [(sample.image_ext, sample.image), ("json", _meta_bytes(sample.meta))])

    shards = _pack(members(), out_dir, splits[0], max_samples, max_bytes)
    index = ShardIndex(split=splits[0], n_samples=sum(s.n_samples for s in shards),
                       langs=sorted({lang for index, _ in sources for lang in index.langs}), shards=shards,
                       source_fingerprint=digest.hexdigest(), location=str(out_dir))
    return _publish(index, out_dir)


def _previous_shard_names(index_path: Path) -> set[str]:
    """Shard names listed by the index already in ``out_dir`` (none when there is none or it is unreadable)."""
    if not index_path.is_file():
        return set()
    try:
        data = json.loads(index_path.read_text(encoding="utf-8"))
        return {s["name"] for s in data["shards"] if _SHARD_NAME.match(str(s["name"]))}
    except (ValueError, KeyError, TypeError):
        return set()


def _remove_stale(out_dir: Path, keep: set[str], previous: set[str]) -> None:
    """Remove the previous index's shards and shard-named or temporary files of ours that the new index omits."""
    for path in out_dir.iterdir():
        name = path.name
        temporary = name.startswith(".") and name.endswith(".part") and (
            name[1:].startswith(INDEX_NAME + ".") or _SHARD_NAME.match(name[1:].split(".tar.")[0] + ".tar"))
        ours = name in previous or _SHARD_NAME.match(name) or temporary
        if ours and name not in keep and path.is_file():
            path.unlink()


# --------------------------------------------------------------------------------------------------- reading


@dataclass
class ShardSample:
    """One sample as the stream hands it to the sample function (raw bytes; nothing decoded)."""

    ordinal: int  # global position of the sample in the index (shard order, then member order): a stable id
    key: str  # the tar key (the ordinal, zero-padded)
    image: bytes  # the image file's bytes
    image_ext: str  # the image member's extension, e.g. "png", "jpg"
    meta: dict  # {"image_id", "captions": {lang: [...]}, "caption_ids": {lang: [...]}, "source"}


def iter_shard(url: str, first_ordinal: int | None = None, n_samples: int | None = None) -> Iterator[ShardSample]:
    """The samples of one shard, read sequentially through fsspec (a local path or any fsspec URL).

    With ``first_ordinal`` the keys are checked to count up from it, and with ``n_samples`` the shard must hold
    exactly that many: a mismatch means the index does not describe this file (a DatasetFormatError).
    """
    expected = first_ordinal
    count = 0
    try:
        with _open(url, "rb") as handle, tarfile.open(fileobj=handle, mode="r|") as archive:
            pending: dict[str, Any] | None = None
            for member in archive:
                if not member.isfile():
                    raise DatasetFormatError(f"{url}: member {member.name!r} is not a regular file; a vlalign shard "
                                             "holds only <key>.<ext> files. Re-write the shards.")
                match = _MEMBER.match(member.name)
                if match is None:
                    raise DatasetFormatError(f"{url}: member {member.name!r}; expected <digits>.<ext> (a vlalign "
                                             "shard). Re-write the shards.")
                data = archive.extractfile(member).read()
                if pending is not None and pending["key"] != match["key"]:
                    yield _sample(url, pending, expected)
                    count += 1
                    expected = None if expected is None else expected + 1
                    pending = None
                if pending is None:
                    pending = {"key": match["key"], "members": {}}
                if match["ext"] in pending["members"]:
                    raise DatasetFormatError(f"{url}: member {member.name!r} repeats; re-write the shards.")
                pending["members"][match["ext"]] = data
            if pending is not None:
                yield _sample(url, pending, expected)
                count += 1
    except FileNotFoundError as exc:
        raise DatasetFormatError(f"{url}: shard not found; `dvc pull` the shards or re-write them "
                                 "(the index names a file that is not there).") from exc
    except (tarfile.TarError, EOFError) as exc:
        raise DatasetFormatError(f"{url}: not a readable tar shard ({type(exc).__name__}: {exc}); the file is "
                                 "truncated or corrupt: `dvc pull` it again or re-write the shards.") from exc
    if n_samples is not None and count != n_samples:
        raise DatasetFormatError(f"{url}: holds {count} samples, the index says {n_samples}; the index does not "
                                 "match the shards. Re-write the shards.")


def _sample(url: str, pending: dict, expected: int | None) -> ShardSample:
    members = pending["members"]
    images = [ext for ext in members if ext != "json"]
    if "json" not in members or len(images) != 1:
        raise DatasetFormatError(f"{url}: sample {pending['key']} has members {sorted(members)}; expected one "
                                 "image and one json. Re-write the shards.")
    ordinal = int(pending["key"])
    if expected is not None and ordinal != expected:
        raise DatasetFormatError(f"{url}: sample key {pending['key']} where ordinal {expected} was expected; the "
                                 "index does not match the shards. Re-write the shards.")
    try:
        meta = json.loads(members["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetFormatError(f"{url}: {pending['key']}.json is not JSON ({exc}); re-write the shards.") from exc
    return ShardSample(ordinal=ordinal, key=pending["key"], image=members[images[0]], image_ext=images[0], meta=meta)


def verify_shards(index: ShardIndex) -> list[str]:
    """Problems found by reading every shard of ``index`` whole (size and SHA-256); empty when all match."""
    problems = []
    for shard in index.shards:
        url = index.shard_url(shard)
        digest, size = hashlib.sha256(), 0
        try:
            with _open(url, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
                    size += len(chunk)
        except FileNotFoundError:
            problems.append(f"{url}: missing")
            continue
        if size != shard.n_bytes or digest.hexdigest() != shard.sha256:
            problems.append(f"{url}: {size} bytes, sha256 {digest.hexdigest()[:16]}; the index says "
                            f"{shard.n_bytes} bytes, sha256 {shard.sha256[:16]}")
    return problems


# --------------------------------------------------------------------------------------------------- planning


def _slots(num_workers: int) -> int:
    """Logical workers per rank: ``num_workers``, or 1 for the main process."""
    return max(1, num_workers)


def _check_layout(index: ShardIndex, seed: int, world_size: int, num_workers: int) -> None:
    if seed < 0:
        raise ConfigError(f"seed={seed}; expected a non-negative integer.")
    if world_size < 1 or num_workers < 0:
        raise ConfigError(f"world_size={world_size}, num_workers={num_workers}; expected world_size >= 1 and "
                          "num_workers >= 0.")
    if len(index.shards) < world_size:
        raise ConfigError(
            f"{index.location or 'shard index'}: {len(index.shards)} shard(s) for {world_size} ranks; every rank "
            f"needs at least one shard. Re-write the shards smaller (max_samples <= "
            f"{max(1, index.n_samples // (world_size * _slots(num_workers)))} gives every worker a shard).")


def plan_epoch(index: ShardIndex, epoch: int, seed: int, world_size: int, num_workers: int) -> list[list[list[int]]]:
    """``[rank][worker]`` -> the shard ordinals (positions in ``index.shards``) that worker reads in ``epoch``.

    The shards are permuted by ``(seed, epoch)``, then dealt in that order, each to the rank holding the fewest
    samples so far (the lowest rank on a tie); a rank deals its shards to its workers the same way. So every
    shard is read exactly once per epoch (no overlap, no gap) and the ranks, and a rank's workers, differ by at
    most one shard's worth of samples (greedy list scheduling). ``num_workers=0`` means one (main-process) worker.

    Fewer shards than ranks raises a ConfigError (a rank without a shard would have 0 steps, and so would every
    rank). Fewer shards than ``world_size * num_workers`` is allowed: the workers left without a shard yield
    nothing and the DataLoader skips them; only their parallelism is lost.
    """
    _check_layout(index, seed, world_size, num_workers)
    rng = np.random.default_rng([seed, epoch, _PLAN_TAG])
    order = rng.permutation(len(index.shards)).tolist()
    sizes = [s.n_samples for s in index.shards]
    by_rank = _deal(order, sizes, world_size)
    return [_deal(shards, sizes, _slots(num_workers)) for shards in by_rank]


def _deal(items: list[int], sizes: list[int], bins: int) -> list[list[int]]:
    """Each item in turn to the bin holding the fewest samples so far (lowest bin on a tie)."""
    out: list[list[int]] = [[] for _ in range(bins)]
    heap = [(0, b) for b in range(bins)]  # (samples so far, bin): already a heap
    for item in items:
        load, target = heapq.heappop(heap)
        out[target].append(item)
        heapq.heappush(heap, (load + sizes[item], target))
    return out


def _plan_batches(index: ShardIndex, plan: list[list[list[int]]], batch_size: int) -> list[list[int]]:
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}; expected at least 1.")
    sizes = [s.n_samples for s in index.shards]
    return [[sum(sizes[s] for s in shards) // batch_size for shards in rank] for rank in plan]


def _plan_steps(index: ShardIndex, full: list[list[int]], batch_size: int, world_size: int, num_workers: int) -> int:
    steps = min(sum(rank) for rank in full)
    if steps == 0:
        raise ConfigError(
            f"{index.location or 'shard index'}: {index.n_samples} samples in {len(index.shards)} shard(s) give "
            f"some rank no full batch of {batch_size} with world_size={world_size}, num_workers={num_workers}; "
            "lower the batch size or the number of workers, or write more, smaller shards.")
    return steps


def batches_per_worker(index: ShardIndex, epoch: int, seed: int, world_size: int, num_workers: int,
                       batch_size: int) -> list[list[int]]:
    """``[rank][worker]`` -> full batches that worker could produce in ``epoch`` (before ranks are equalised)."""
    return _plan_batches(index, plan_epoch(index, epoch, seed, world_size, num_workers), batch_size)


def steps_in_epoch(index: ShardIndex, epoch: int, seed: int, world_size: int, num_workers: int,
                   batch_size: int) -> int:
    """Batches EVERY rank yields in ``epoch``: the minimum over ranks of its workers' full batches.

    Each worker batches its own samples and drops its last partial batch; the ranks with more batches stop at
    the minimum, so DDP never waits on a rank that has run dry. At most ``(W - 1) * S + W * N * (B - 1)``
    samples are left out per epoch (module docstring). Raises ConfigError when the epoch would have no step.
    """
    full = batches_per_worker(index, epoch, seed, world_size, num_workers, batch_size)
    return _plan_steps(index, full, batch_size, world_size, num_workers)


def dropped_bound(index: ShardIndex, world_size: int, num_workers: int, batch_size: int) -> int:
    """The most samples an epoch leaves out: ``(W - 1) * S + W * N * (B - 1)``, S = the largest shard's samples."""
    largest = max(s.n_samples for s in index.shards)
    return (world_size - 1) * largest + world_size * _slots(num_workers) * (batch_size - 1)


def consumed_per_worker(batches_per_worker: Sequence[int], k: int) -> list[int]:
    """How many batches each worker has produced once a rank has yielded its first ``k`` batches.

    A torch DataLoader over an IterableDataset (``in_order=True``, the default) hands out tasks to its workers
    round-robin, starting at worker 0 each epoch, and returns results in task order; a worker that is exhausted
    returns a stop marker once and is then skipped (torch 2.14 ``_MultiProcessingDataLoaderIter._reset``,
    ``_try_put_index`` and ``_next_data``). So batches come in rounds: in round ``j`` every worker with more
    than ``j`` batches yields one, in worker order.
    """
    counts = [int(b) for b in batches_per_worker]
    if k < 0 or k > sum(counts):
        raise ConfigError(f"position {k} is outside the {sum(counts)} batches of this rank's epoch.")
    lo, hi = 0, max(counts, default=0)  # the number r of complete rounds: the largest with sum(min(b, r)) <= k
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(b, mid) for b in counts) <= k:
            lo = mid
        else:
            hi = mid - 1
    out = [min(b, lo) for b in counts]
    extra = k - sum(out)
    for w, b in enumerate(counts):  # the partial round: the first `extra` workers still holding batches
        if extra and b > lo:
            out[w] += 1
            extra -= 1
    return out


def next_worker(batches_per_worker: Sequence[int], k: int) -> int:
    """The worker that yields batch ``k`` (0-based) of the round-robin sequence (0 when there is none)."""
    counts = [int(b) for b in batches_per_worker]
    if k >= sum(counts):
        return 0
    done = consumed_per_worker(counts, k)
    after = consumed_per_worker(counts, k + 1)
    return next(w for w in range(len(counts)) if after[w] != done[w])


def buffer_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) int64: the order in which a shuffle buffer of ``buffer`` slots emits ``n`` arriving items.

    The buffer fills with the first ``buffer`` items; each further item replaces a uniformly drawn slot, whose
    item is emitted; at the end the buffer is drained in random order. The draws depend on ``n`` only, never on
    the items, which is what lets a resumed worker skip without reading. ``buffer <= 1`` keeps arrival order.
    """
    if buffer <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    size = min(buffer, n)
    slots = list(range(size))
    out = array.array("q")  # 8 bytes per item, not a Python int each
    for begin in range(0, n - size, _DRAW_CHUNK):  # steady state: (n - size,) draws, in fixed-size chunks
        for i, j in enumerate(rng.integers(0, size, size=min(_DRAW_CHUNK, n - size - begin)).tolist(), begin):
            out.append(slots[j])
            slots[j] = size + i
    for j in rng.integers(0, np.arange(size, 0, -1)).tolist():  # drain: one draw per remaining length
        out.append(slots[j])
        slots[j] = slots[-1]
        slots.pop()
    return np.frombuffer(out, dtype=np.int64).copy()


def _order(index: ShardIndex, shards: list[int], epoch: int, seed: int, rank: int, worker: int,
           shuffle_buffer: int) -> np.ndarray:
    starts = index.shard_starts()
    if not shards:
        return np.zeros(0, dtype=np.int64)
    arrivals = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in shards])  # (n,) in read order
    rng = np.random.default_rng([seed, epoch, rank, worker, _BUFFER_TAG])
    return arrivals[buffer_order(len(arrivals), shuffle_buffer, rng)]


def worker_order(index: ShardIndex, epoch: int, seed: int, rank: int, world_size: int, num_workers: int,
                 worker: int, shuffle_buffer: int) -> np.ndarray:
    """(n,) int64: ordinals of every sample of this worker's shards, in the order the worker emits them."""
    plan = plan_epoch(index, epoch, seed, world_size, num_workers)
    return _order(index, plan[rank][worker], epoch, seed, rank, worker, shuffle_buffer)


@dataclass
class _WorkerPlan:
    """What one logical worker does in the current epoch, from the current position on."""

    worker: int  # logical worker id
    shards: list[int]  # its shards, in plan order
    done: int  # batches it had produced before the position
    cap: int  # batches it produces in the whole epoch (its share of the rank's steps)

    @property
    def batches(self) -> int:
        """Batches it yields from the position on."""
        return self.cap - self.done


def _worker_plans(index: ShardIndex, epoch: int, seed: int, rank: int, world_size: int, num_workers: int,
                  batch_size: int, start_batch: int) -> tuple[list[_WorkerPlan], int]:
    """Every logical worker's plan for this rank, and the worker that yields batch ``start_batch``."""
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank={rank}; expected 0 <= rank < world_size={world_size}.")
    plan = plan_epoch(index, epoch, seed, world_size, num_workers)
    full = _plan_batches(index, plan, batch_size)
    steps = _plan_steps(index, full, batch_size, world_size, num_workers)
    if not 0 <= start_batch <= steps:
        raise ConfigError(f"start_batch={start_batch}; epoch {epoch} has {steps} batches per rank. The position "
                          "comes from a checkpoint of another data layout (shards, batch size, ranks or workers).")
    caps = consumed_per_worker(full[rank], steps)  # the first `steps` batches of the round-robin, per worker
    done = consumed_per_worker(caps, start_batch)
    plans = [_WorkerPlan(worker=w, shards=plan[rank][w], done=done[w], cap=caps[w]) for w in range(len(caps))]
    return plans, next_worker(caps, start_batch)


def _needed(index: ShardIndex, plan: _WorkerPlan, epoch: int, seed: int, rank: int, batch_size: int,
            shuffle_buffer: int) -> np.ndarray:
    """(M,) ordinals a worker emits from the position on, in order; M = its remaining batches * batch_size."""
    order = _order(index, plan.shards, epoch, seed, rank, plan.worker, shuffle_buffer)
    return order[plan.done * batch_size:plan.cap * batch_size]


def rank_batches(index: ShardIndex, epoch: int, seed: int, rank: int, world_size: int, num_workers: int,
                 batch_size: int, shuffle_buffer: int, start_batch: int = 0) -> list[np.ndarray]:
    """The ordinals of each batch a rank yields in ``epoch`` from ``start_batch`` on, computed from the index
    alone (no shard is read): what :class:`ShardStream` yields, for tests, debugging and planning."""
    plans, first = _worker_plans(index, epoch, seed, rank, world_size, num_workers, batch_size, start_batch)
    queues = {}
    for p in plans:
        needed = _needed(index, p, epoch, seed, rank, batch_size, shuffle_buffer)
        queues[p.worker] = iter([needed[i * batch_size:(i + 1) * batch_size] for i in range(p.batches)])
    return list(_round_robin(queues, first, len(plans)))


def _round_robin(iterators: dict[int, Iterator], first: int, n: int) -> Iterator:
    """Items of ``iterators`` taken in turn from worker ``first`` on, skipping exhausted ones (the DataLoader's
    order when its physical worker ``i`` runs logical worker ``(first + i) % n``)."""
    active = [(first + i) % n for i in range(n)]
    while active:
        for w in list(active):
            try:
                yield next(iterators[w])
            except StopIteration:
                active.remove(w)


class ShardStream(torch.utils.data.IterableDataset):
    """One rank's batches of an epoch of a shard index, from a position on (module docstring)."""

    def __init__(
        self,
        index: ShardIndex,
        sample_fn: Callable[[ShardSample, int], dict[str, torch.Tensor]],
        collate_fn: Callable[[list[dict]], dict],
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
    ) -> None:
        if shuffle_buffer < 0:
            raise ConfigError(f"shuffle_buffer={shuffle_buffer}; expected >= 0 (0 or 1: no shuffling).")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank}; expected 0 <= rank < world_size={world_size}.")
        self.index = index  # the shards to stream
        self.sample_fn = sample_fn  # (sample, epoch) -> dict of tensors: decode, augment, pick a caption
        self.collate_fn = collate_fn  # list of sample dicts -> batch
        self.batch_size = batch_size  # samples per batch, per rank
        self.seed = seed  # seeds the shard permutation and the shuffle buffers (with epoch, rank, worker)
        self.rank = rank  # this process's rank
        self.world_size = world_size  # ranks in the job
        self.num_workers = num_workers  # DataLoader workers (0: the main process)
        self.shuffle_buffer = shuffle_buffer  # slots of each worker's shuffle buffer
        self.epoch = 0  # the epoch streamed
        self.start_batch = 0  # batches of the epoch already consumed (the resume position)
        steps_in_epoch(index, 0, seed, world_size, num_workers, batch_size)  # fail at construction on a bad layout

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """Stream ``epoch`` from its batch ``start_batch`` on (the checkpoint's position: batches consumed)."""
        if epoch < 0:
            raise ConfigError(f"epoch={epoch}; expected >= 0.")
        steps = self.steps(epoch)
        if not 0 <= start_batch <= steps:
            raise ConfigError(f"start_batch={start_batch}; epoch {epoch} has {steps} batches per rank. The position "
                              "comes from a checkpoint of another data layout (shards, batch size, ranks or workers).")
        self.epoch, self.start_batch = epoch, start_batch

    def steps(self, epoch: int | None = None) -> int:
        """Batches every rank yields in ``epoch`` (default: the current one), from its start."""
        epoch = self.epoch if epoch is None else epoch
        return steps_in_epoch(self.index, epoch, self.seed, self.world_size, self.num_workers, self.batch_size)

    def __len__(self) -> int:
        return self.steps() - self.start_batch

    def layout(self) -> dict[str, Any]:
        """What a position depends on besides (epoch, batch): store it beside the position, compare on resume."""
        names = hashlib.sha256("\n".join(s.sha256 for s in self.index.shards).encode()).hexdigest()
        return {"shards_sha256": names, "seed": self.seed, "world_size": self.world_size,
                "num_workers": _slots(self.num_workers), "batch_size": self.batch_size,
                "shuffle_buffer": max(1, self.shuffle_buffer)}

    def check_layout(self, saved: dict[str, Any]) -> None:
        """Raise ConfigError naming each field of ``saved`` (a stored :meth:`layout`) that differs now."""
        current = self.layout()
        diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
        if diff:
            shown = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ConfigError(f"the data stream differs from the checkpoint's ({shown}); an exact resume needs the "
                              "same shards, seed, ranks, workers, batch size and shuffle buffer.")

    def __iter__(self) -> Iterator[dict]:
        plans, first = _worker_plans(self.index, self.epoch, self.seed, self.rank, self.world_size,
                                     self.num_workers, self.batch_size, self.start_batch)
        n = len(plans)
        info = torch.utils.data.get_worker_info()
        if info is None:  # main process: interleave the logical workers as a DataLoader with n workers would
            yield from _round_robin({p.worker: self._batches(p) for p in plans}, first, n)
            return
        if info.num_workers != n:
            raise ConfigError(f"the DataLoader has num_workers={info.num_workers} but the ShardStream was built for "
                              f"{self.num_workers}; pass num_workers=stream.num_workers to the DataLoader.")
        yield from self._batches(plans[(info.id + first) % n])

    def _batches(self, plan: _WorkerPlan) -> Iterator[dict]:
        """A worker's batches: its needed samples, read from its shards in order, decoded by ``sample_fn``."""
        needed = _needed(self.index, plan, self.epoch, self.seed, self.rank, self.batch_size, self.shuffle_buffer)
        records = self._records(plan.shards, needed)
        for _ in range(plan.batches):
            samples = [next(records) for _ in range(self.batch_size)]
            yield self.collate_fn([self.sample_fn(sample, self.epoch) for sample in samples])
        records.close()

    def _records(self, shards: list[int], needed: np.ndarray) -> Iterator[ShardSample]:
        """The samples of ``needed`` in that order, reading only the shards that hold some of them; a sample
        read before its turn waits in memory (at most the shuffle buffer's size of them)."""
        if not len(needed):
            return
        starts = self.index.shard_starts()
        offset = np.zeros(len(self.index.shards), dtype=np.int64)  # per shard: its first position in this worker
        offset[shards] = np.cumsum([0] + [self.index.shards[s].n_samples for s in shards[:-1]])
        shard_of = np.searchsorted(starts, needed, side="right") - 1  # (M,)
        wanted = np.zeros(sum(self.index.shards[s].n_samples for s in shards), dtype=bool)  # by worker position
        wanted[offset[shard_of] + needed - starts[shard_of]] = True
        holding = set(np.unique(shard_of).tolist())  # the shards holding some needed sample

        def reader() -> Iterator[tuple[int, ShardSample]]:
            for s in shards:
                if s in holding:
                    shard = self.index.shards[s]
                    for sample in iter_shard(self.index.shard_url(shard), int(starts[s]), shard.n_samples):
                        yield int(offset[s]) + sample.ordinal - int(starts[s]), sample

        source = reader()
        waiting: dict[int, ShardSample] = {}
        try:
            for target in map(int, needed):  # not .tolist(): no Python int per needed sample at once
                while target not in waiting:
                    position, sample = next(source, (None, None))
                    if sample is None:
                        raise DatasetFormatError(f"{self.index.location}: sample {target} was not found in the "
                                                 "shards; the index does not match them. Re-write the shards.")
                    if wanted[position]:
                        waiting[sample.ordinal] = sample
                yield waiting.pop(target)
        finally:
            source.close()
