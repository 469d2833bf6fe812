"""The one way vlalign reads an image file of a corpus: contained in its declared roots, regular, bounded.

A corpus is untrusted input. An annotation entry may name an absolute path (``/etc/hostname``), climb out with
``../``, or point at a symlink inside the image folder that leads elsewhere; an image folder may hold a FIFO or a
device. So every image reference is checked before anything opens it:

1. **Containment.** The path is resolved (symlinks followed, ``..`` collapsed, :func:`os.path.realpath`) and
   must lie inside one of the row's *allowed roots*. The roots are resolved once, when the configuration is read
   (:func:`resolve_roots`), so a configured root that is itself a link (``data/01_raw/coco_cn/images/train2014 ->
   /mnt/coco/train2014``) is allowed on purpose, while a link to a single file outside is still refused.
2. **Regular file.** Only a regular file is opened; a FIFO, a device or a directory is refused unopened.
3. **Bounded decoding.** An image whose header declares more than ``max_pixels`` pixels is refused before its
   pixels are decoded: the size is read from the header by Pillow's format plugin alone (:func:`declared_size`), so
   this check comes first even for sizes that Pillow's own decompression-bomb guard would refuse in ``Image.open``.
   That guard stays on for everything that is then decoded.

A manifest row carries its allowed roots in the column ``image_root`` as one string, the resolved roots joined
with :data:`os.pathsep` (:func:`encode_roots` / :func:`decode_roots`).
"""

from __future__ import annotations

import os
import stat
import struct
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vlalign.errors import ConfigError, DatasetFormatError

#: Default largest image (pixels = width x height) that is decoded; larger ones are refused unopened.
DEFAULT_MAX_PIXELS = 64_000_000


class ImageAccessError(DatasetFormatError):
    """An image reference may not be read: outside its roots, not a regular file, too large, or undecodable."""


def resolve_roots(roots: Iterable[str | Path], *, must_exist: bool = False, what: str = "image root") -> list[str]:
    """Resolved absolute roots (symlinks followed), in order and without repeats.

    Call this once when the configuration is read. A root containing :data:`os.pathsep` cannot be encoded in the
    manifest and is refused; with ``must_exist`` a root that is not a directory is a :class:`DatasetFormatError`.
    """
    resolved: list[str] = []
    for root in roots:
        text = os.path.realpath(os.path.abspath(os.fspath(root)))
        if os.pathsep in text:
            raise ConfigError(f"{what} {root!r} contains {os.pathsep!r}, which vlalign uses to join roots; rename or link it.")
        if must_exist and not os.path.isdir(text):
            raise DatasetFormatError(f"{root}: {what} not found (resolves to {text}); fix the path in the data catalog.")
        if text not in resolved:
            resolved.append(text)
    return resolved


def encode_roots(roots: Sequence[str]) -> str:
    """The ``image_root`` column value for these (already resolved) roots."""
    return os.pathsep.join(roots)


def decode_roots(value: str | None) -> list[str]:
    """The roots an ``image_root`` column value allows (none for a null value)."""
    if not isinstance(value, str) or not value:
        return []
    return value.split(os.pathsep)


def _inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def containment_problem(path: str | None, roots: Sequence[str]) -> str | None:
    """Why ``path`` may not be read under ``roots`` (resolved roots), or None when it resolves inside one.

    Nothing is opened: only the path's components are looked up (lstat) to follow links.
    """
    if not isinstance(path, str) or not path:
        return "the entry names no image path"
    if not roots:
        return f"image {path} has no declared image root, so it cannot be checked; declare the corpus's image folder"
    real = os.path.realpath(path)
    if any(_inside(real, root) for root in roots):
        return None
    shown = roots[0] if len(roots) == 1 else list(roots)
    via = "" if real == os.path.normpath(path) else f" (it resolves to {real})"
    return (
        f"image path {path}{via} is outside the image root {shown}; only files inside the corpus's declared "
        "image folders are read. List the folder in extra_image_roots if it is meant to be used"
    )


def file_kind_problem(path: str) -> str | None:
    """Why the (contained) ``path`` is not a readable regular file, or None. A missing file returns None:
    existence is checked and reported separately."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"image {path} cannot be inspected ({exc.strerror})"
    if stat.S_ISREG(mode):
        return None
    kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else
            "not a regular file")
    return f"image {path} is {kind}, not a regular file; it is never opened"


def open_regular_file(real: str):
    """Open ``real`` read-only without following a final symlink and without blocking; refuse non-regular files."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(real, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageAccessError(f"image {real} is not a regular file; it is never read.")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_image_bytes(path: str, roots: Sequence[str]) -> bytes:
    """The bytes of a contained, regular image file (e.g. to copy it into a shard), or an :class:`ImageAccessError`."""
    problem = containment_problem(path, roots)
    if problem is not None:
        raise ImageAccessError(problem + ".")
    with open_regular_file(os.path.realpath(path)) as handle:
        return handle.read()


def open_image(path: str, roots: Sequence[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a contained, regular image file of at most ``max_pixels`` pixels into a loaded PIL image.

    Raises :class:`ImageAccessError` naming the path and the reason; the file is not opened when it lies outside
    ``roots`` and its pixels are not decoded when its header declares more than ``max_pixels``.
    """
    problem = containment_problem(path, roots)
    if problem is not None:
        raise ImageAccessError(problem + ".")
    try:
        with open_regular_file(os.path.realpath(path)) as handle:
            return decode_image(handle, path, max_pixels)
    except FileNotFoundError as exc:
        raise ImageAccessError(f"image file {path} does not exist.") from exc


def declared_size(handle) -> tuple[int, int]:
    """``(width, height)`` that an image file's header declares, without decoding a pixel.

    ``Image.open`` reads only the header too, but it then applies Pillow's decompression-bomb check, which raises
    ``DecompressionBombError`` above ``2 * Image.MAX_IMAGE_PIXELS``; vlalign's own ``max_pixels`` check must come
    first, so this does what ``Image.open`` does (find the format plugin that accepts the first bytes and let it
    parse the header) without that check and without touching ``Image.MAX_IMAGE_PIXELS`` (other threads decode
    meanwhile). The handle is left where it was.

    Raises:
        PIL.UnidentifiedImageError: no installed format plugin reads the header.
    """
    start = handle.tell()
    prefix = handle.read(16)
    tried: set[str] = set()
    try:
        for load_plugins in (Image.preinit, Image.init):  # the common formats first, then every installed one
            load_plugins()
            for fmt in [f for f in Image.ID if f not in tried]:
                tried.add(fmt)
                factory, accept = Image.OPEN[fmt]
                accepted = not accept or accept(prefix)
                if not accepted or isinstance(accepted, str):  # a str is Pillow's "looks like, but unsupported"
                    continue
                handle.seek(start)
                try:
                    with factory(handle, "") as image:  # parses the header; the stream is not closed on exit
                        return image.size
                except (SyntaxError, IndexError, TypeError, struct.error):  # Image.open: "not this format"
                    continue
    finally:
        handle.seek(start)
    raise UnidentifiedImageError("cannot identify image file: no image format reads its header")


def decode_image(handle, where: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image from an open binary file (or BytesIO), refusing headers above ``max_pixels`` undecoded."""
    try:
        width, height = declared_size(handle)
        if width * height > max_pixels:
            raise ImageAccessError(f"image {where} is {width}x{height} = {width * height:,} pixels, more than the "
                                   f"{max_pixels:,} allowed (max_image_pixels); it was not decoded.")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(handle)
            image.load()
            return image
    except ImageAccessError:
        raise
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, bomb errors) for bad files
        raise ImageAccessError(f"image {where} does not decode ({type(exc).__name__}: {exc}).") from exc


def inspect_image(path: str | None, roots: Sequence[str], max_pixels: int = DEFAULT_MAX_PIXELS,
                  open_files: bool = True) -> dict:
    """Check one image reference the way validation needs it, opening nothing that may not be opened.

    Returns ``{"inside_root", "regular_file", "exists", "decodes", "width", "height", "pixels", "error", "problem"}``;
    a check that was not reached is None (e.g. nothing after containment is looked at for a path outside its
    roots, and the pixels of an image above ``max_pixels`` are never decoded). ``problem`` is the sentence for a
    failed containment or file-type check, ``error`` the decoder's message.
    """
    out = dict.fromkeys(("inside_root", "regular_file", "exists", "decodes", "width", "height", "pixels", "error",
                         "problem"))
    problem = containment_problem(path, roots)
    out["inside_root"] = problem is None
    if problem is not None or not open_files:
        out["problem"] = problem
        return out
    problem = file_kind_problem(path)
    if problem is not None:
        out.update(regular_file=False, problem=problem)
        return out
    if not os.path.exists(path):
        out["exists"] = False
        return out
    out.update(regular_file=True, exists=True)
    try:
        with open_regular_file(os.path.realpath(path)) as handle:
            width, height = declared_size(handle)  # the header only, before Pillow's own bomb check
            out.update(width=width, height=height, pixels=width * height)
            if width * height > max_pixels:
                return out  # never decoded
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(handle) as image:
                    image.verify()  # structure and checksums without decoding pixels
                handle.seek(0)
                with Image.open(handle) as image:
                    image.load()  # every pixel: catches truncated data that verify misses
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, bomb errors) for bad files
        out.update(decodes=False, error=f"{type(exc).__name__}: {exc}")
        return out
    out["decodes"] = True
    return out
