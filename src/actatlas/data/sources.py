"""Image sources: where the images whose activations we collect come from.

`images(spec)` turns what the user typed into an `ImageSource`, an ordered, indexable list of
`ImageItem`s with a `load` method that always returns an RGB PIL image:

* a folder: every image file below it (recursively by default), sorted by relative path;
* a text file (``.txt``, ``.lst``, ``.list``) of paths, one per line, in the order given;
* a list or tuple of paths;
* ``"sample"`` / ``"sample:N"``: N random crops of the photographs bundled with scikit-image
  (see `actatlas.data.bundled`);
* a single image file (a source of one image).

Every decoding problem surfaces as `ImageDecodeError` (never a bare PIL exception), so a
collector can skip the bad file and go on. Every problem with the spec itself (missing path, empty
folder, bad ``sample:N``) is a `UserError`.
"""

from __future__ import annotations

import hashlib
import logging
import operator
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from ..errors import DataError, UserError
from . import bundled
from .decode import (DEFAULT_MAX_PIXELS, SAMPLE_PREFIX, ImageDecodeError, ImageItem,  # noqa: F401  (re-exported)
                     check_max_pixels, load_file, to_rgb)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
"""File extensions (compared case-insensitively) that a folder listing treats as images."""

LIST_EXTENSIONS = (".txt", ".lst", ".list")
"""A regular file with one of these extensions is read as a list of image paths."""

_WNID_PREFIX = re.compile(r"^(n\d{8})(?!\d)")

def load_rgb(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
             min_side: int | None = None) -> Image.Image:
    """Decode an image file (see `actatlas.data.decode.load_file`: EXIF orientation, every mode to
    8-bit RGB, the pixel cap, reduced-scale JPEG decoding) or a bundled-sample crop path
    ``"sample:<photo>#x0,y0,x1,y1"`` into an RGB PIL image; `ImageDecodeError` on any problem."""
    text = os.fspath(path)
    if isinstance(text, str) and text.startswith(SAMPLE_PREFIX):
        return bundled.load_crop(text)
    return load_file(text, max_pixels=max_pixels, min_side=min_side)


class ImageSource(Sequence):
    """An ordered list of `ImageItem`s plus a way to load them.

    ``len(source)``, ``source[i]`` (an `ImageItem`, negative indices allowed) and ``source[a:b]``
    (a new `ImageSource`) work as for a list. Build one with `images`.

    Attributes:
        description: human-readable, e.g. ``"folder /data/val (50000 images)"``.
        skipped_listing: files seen while listing a folder that do not have an image extension
            (informational; hidden files are not listed at all).
        max_pixels: `load` refuses (`ImageDecodeError`, so collectors skip and count it) a file
            whose header says it has more pixels than this; None: no cap (see `load_rgb`).
    """

    def __init__(
        self,
        items: Iterable[ImageItem],
        what: str,
        *,
        skipped_listing: Iterable[str] = (),
        fingerprint_salt: str = "",
        stat_files: bool = True,
        total: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        self._items: tuple[ImageItem, ...] = tuple(items)
        self.max_pixels: int | None = check_max_pixels(max_pixels)
        self._what = what
        self._salt = fingerprint_salt
        self._stat_files = stat_files
        self._total = len(self._items) if total is None else total
        self.skipped_listing: list[str] = list(skipped_listing)

    # -- Sequence protocol ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self._subset(self._items[key])
        return self._items[operator.index(key)]

    def __iter__(self) -> Iterator[ImageItem]:
        return iter(self._items)

    def __repr__(self) -> str:
        return f"<ImageSource {self.description}>"

    # -- public API ----------------------------------------------------------------------------

    @property
    def description(self) -> str:
        n = len(self._items)
        unit = "image" if self._total == 1 else "images"
        if n == self._total:
            return f"{self._what} ({n} {unit})"
        return f"{self._what} ({n} of {self._total} {unit})"

    @property
    def items(self) -> tuple[ImageItem, ...]:
        """All items, in order."""
        return self._items

    def load(self, item: ImageItem, *, min_side: int | None = None) -> Image.Image:
        """Decode one item as an RGB PIL image; raises `ImageDecodeError` (also for a file over
        `max_pixels`). `min_side`: the short side the caller needs; a larger JPEG may decode at a
        reduced scale that keeps it (see `load_rgb`)."""
        return load_rgb(item.path, max_pixels=self.max_pixels, min_side=min_side)

    def with_max_pixels(self, max_pixels: int | None) -> "ImageSource":
        """The same items with another pixel cap (None or 0: none)."""
        return self._subset(self._items, max_pixels=max_pixels)

    def head(self, n: int) -> "ImageSource":
        """The first `n` items (all of them when n >= len); the CLI's ``--limit N``."""
        n = operator.index(n)
        if n < 0:
            raise DataError(f"limit must be >= 0, not {n}")
        return self._subset(self._items[:n])

    def fingerprint(self) -> str:
        """sha256 hex digest identifying the source's content, for run-config hashing.

        Files: over the ordered list of (path, size, mtime_ns, label_key), so editing, touching,
        adding, removing or reordering a file changes it (a missing file counts as size -1).
        Bundled crops: over the crop specs (the paths, which hold photo name and box) and the seed.
        A `max_pixels` other than the default is included too.
        """
        h = hashlib.sha256()
        h.update(f"actatlas-images-v1\n{self._salt}\n".encode())
        if self.max_pixels != DEFAULT_MAX_PIXELS:  # the cap decides which files are skipped
            h.update(f"max_pixels\t{self.max_pixels}\n".encode())
        for item in self._items:
            size, mtime = -1, -1
            if self._stat_files:
                try:
                    st = os.stat(item.path)
                    size, mtime = st.st_size, st.st_mtime_ns
                except OSError:
                    pass
            h.update(f"{item.path}\t{size}\t{mtime}\t{item.label_key or ''}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def labels(self, class_names: Sequence[str], wnids: Sequence[str] | None = None) -> np.ndarray:
        """Class index of every item (int64 [len]); -1 where unknown.

        A label_key resolves first as a wnid (when `wnids` is given), then as a class name
        (case-insensitive, ``_`` equal to a space). Keys that match nothing, or a name shared by
        several classes (ImageNet has two "crane"s), give -1 and one logged warning with their
        count. Items without a key give -1 silently. Never raises.
        """
        by_wnid = {w: i for i, w in enumerate(wnids)} if wnids is not None else {}
        by_name: dict[str, int] = {}
        for i, name in enumerate(class_names):
            k = _norm_name(name)
            by_name[k] = -2 if k in by_name else i  # -2 marks an ambiguous name
        out = np.full(len(self._items), -1, dtype=np.int64)
        cache: dict[str, int] = {}
        unresolved: dict[str, int] = {}
        for pos, item in enumerate(self._items):
            key = item.label_key
            if key is None:
                continue
            idx = cache.get(key)
            if idx is None:
                idx = by_wnid.get(key.strip(), by_name.get(_norm_name(key), -1))
                cache[key] = idx
            if idx >= 0:
                out[pos] = idx
            else:
                unresolved[key] = unresolved.get(key, 0) + 1
        if unresolved:
            examples = ", ".join(repr(k) for k in list(unresolved)[:5])
            log.warning(
                "%d label keys (%d images) match no class and get label -1, e.g. %s",
                len(unresolved), sum(unresolved.values()), examples,
            )
        return out

    # -- helpers -------------------------------------------------------------------------------

    def _subset(self, items: Sequence[ImageItem], **changes) -> "ImageSource":
        kwargs = dict(
            skipped_listing=self.skipped_listing,
            fingerprint_salt=self._salt,
            stat_files=self._stat_files,
            total=self._total,
            max_pixels=self.max_pixels,
        )
        kwargs.update(changes)
        return ImageSource(items, self._what, **kwargs)


def _norm_name(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())


def _wnid_of(name: str) -> str | None:
    m = _WNID_PREFIX.match(name)
    return m.group(1) if m else None


def is_image_name(name: str) -> bool:
    """Whether a file name has one of `IMAGE_EXTENSIONS` (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


# --------------------------------------------------------------------------------------------
# Building sources


_KEEP = object()


def images(spec, *, recursive: bool = True, seed: int = 0, max_pixels=_KEEP) -> ImageSource:
    """Build an `ImageSource` from what the user gave.

    Args:
        spec: one of
            * a folder (str or Path): image files (`IMAGE_EXTENSIONS`, case-insensitive) below it,
              sorted by relative path (component by component), hidden files and folders (names
              starting with '.') ignored. label_key: the file name's wnid prefix
              (``n01440764_123.JPEG``), else the name of the image's parent folder when that is a
              sub-folder of the root (a wnid prefix of the folder name is taken alone), else None.
            * a text file with suffix .txt/.lst/.list: one path per line, optionally followed by a
              TAB and a label_key; blank lines and lines starting with '#' are ignored; relative
              paths are resolved against the text file's folder; the order is kept as written.
            * a list or tuple of paths (or of (path, label_key) pairs), order kept; relative paths
              resolve against the current directory.
            * ``"sample"`` or ``"sample:N"``: N (default 512) seeded random square crops of the
              photos bundled with scikit-image (see `actatlas.data.bundled`). This meaning wins
              over a file or folder named "sample" (write "./sample" for that).
            * a single image file: a source of one image.
            * an `ImageSource`: returned as is.
          For list entries without an explicit label, label_key is the file name's wnid prefix,
          else the parent folder's name if that is a wnid, else None.
        recursive: for folders, also list sub-folders (default True).
        seed: seed of the bundled-sample crops (ignored otherwise).
        max_pixels: the source's pixel cap (see `ImageSource.load`): files whose header says they
            have more pixels are skipped as unreadable. Default `DEFAULT_MAX_PIXELS` (50 MP), or
            for an `ImageSource` its own cap; None or 0: no cap.

    Raises:
        UserError: missing path, a folder without images, an empty list, a bad ``sample:N``, a bad
            `max_pixels`.
    """
    if max_pixels is _KEEP:
        source = _images(spec, recursive=recursive, seed=seed)
    else:
        max_pixels = check_max_pixels(max_pixels)
        source = _images(spec, recursive=recursive, seed=seed)
        if source.max_pixels != max_pixels:
            source = source.with_max_pixels(max_pixels)
    return source


def _images(spec, *, recursive: bool, seed: int) -> ImageSource:
    if isinstance(spec, ImageSource):
        return spec
    if isinstance(spec, (list, tuple)):
        return _from_entries(spec, Path.cwd(), "list of paths")
    if not isinstance(spec, (str, os.PathLike)):
        raise DataError(f"cannot read images from a {type(spec).__name__}; give a folder, a text file or 'sample'")
    text = os.fspath(spec)
    if isinstance(text, str) and (text == "sample" or text.startswith(SAMPLE_PREFIX)):
        return _sample_source(text, seed=seed)
    path = Path(os.path.expanduser(text))
    if not path.exists():
        raise DataError(
            f"image source {text!r} does not exist (give a folder of images, a .txt list of paths, or 'sample')"
        )
    path = Path(os.path.abspath(path))
    if path.is_dir():
        return _from_folder(path, recursive=recursive)
    if path.is_file() and path.suffix.lower() in LIST_EXTENSIONS:
        return _from_list_file(path)
    if path.is_file() and is_image_name(path.name):
        key = _wnid_of(path.name) or _wnid_of(path.parent.name)
        return ImageSource([ImageItem(0, str(path), key)], f"file {path}")
    raise DataError(
        f"{text!r} is neither a folder, a list of paths ({', '.join(LIST_EXTENSIONS)}) nor an image "
        f"file ({', '.join(IMAGE_EXTENSIONS)})"
    )


def _from_folder(root: Path, *, recursive: bool) -> ImageSource:
    found: list[tuple[tuple[str, ...], str]] = []  # (relative parts, absolute path)
    skipped: list[str] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=_walk_error):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop or a folder linked twice
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")] if recursive else []
        rel_dir = os.path.relpath(dirpath, root)
        rel_parts = () if rel_dir == os.curdir else tuple(Path(rel_dir).parts)
        for name in filenames:
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            if is_image_name(name):
                found.append((rel_parts + (name,), full))
            else:
                skipped.append(full)
    if not found:
        exts = ", ".join(IMAGE_EXTENSIONS)
        extra = ""
        if skipped:
            extra = f"; skipped {len(skipped)} other files such as {os.path.basename(sorted(skipped)[0])!r}"
        if not recursive:
            extra += "; sub-folders were not searched"
        raise DataError(f"no images found in {root} (looked for {exts}, any case{extra})")
    found.sort(key=lambda t: t[0])
    items = []
    for i, (parts, full) in enumerate(found):
        key = _wnid_of(parts[-1])
        if key is None and len(parts) > 1:
            folder = parts[-2]
            key = _wnid_of(folder) or folder
        items.append(ImageItem(i, full, key))
    skipped.sort()
    if skipped:
        log.info("%s: %d files without an image extension were skipped", root, len(skipped))
    return ImageSource(items, f"folder {root}", skipped_listing=skipped)


def _walk_error(err: OSError) -> None:
    log.warning("cannot list %s: %s", getattr(err, "filename", "?"), err.strerror or err)


def _from_list_file(path: Path) -> ImageSource:
    try:
        text = path.read_text("utf-8", errors="surrogateescape")
    except OSError as e:
        raise DataError(f"cannot read list of images {path}: {e}") from e
    entries: list[tuple[str, str | None]] = []
    for line in text.splitlines():
        line = line.rstrip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        file_part, sep, label = line.partition("\t")
        label = label.strip() if sep else ""
        entries.append((file_part.strip(), label or None))
    return _from_entries(entries, path.parent, f"list {path}")


def _from_entries(entries: Sequence, base: Path, what: str) -> ImageSource:
    if len(entries) == 0:
        raise DataError(f"{what} names no images")
    items = []
    for i, entry in enumerate(entries):
        label = None
        if isinstance(entry, tuple) and len(entry) == 2:
            entry, label = entry
        if not isinstance(entry, (str, os.PathLike)):
            raise DataError(f"{what}: entry {i} is a {type(entry).__name__}, not a path")
        if isinstance(entry, str) and entry.startswith(SAMPLE_PREFIX):  # a bundled crop, kept verbatim
            items.append(ImageItem(i, entry, label))
            continue
        p = Path(os.path.expanduser(os.fspath(entry)))
        if not p.is_absolute():
            p = base / p
        full = os.path.abspath(p)
        if label is None:
            label = _wnid_of(p.name) or _wnid_of(p.parent.name)
        items.append(ImageItem(i, full, label))
    missing = [it.path for it in items if not it.path.startswith(SAMPLE_PREFIX) and not os.path.isfile(it.path)]
    if len(missing) == len(items):
        raise DataError(f"{what}: none of the {len(items)} listed files exist (e.g. {missing[0]})")
    if missing:
        log.warning("%s: %d of %d listed files do not exist, e.g. %s", what, len(missing), len(items), missing[0])
    return ImageSource(items, what)


def _sample_source(spec: str = "sample", *, seed: int = 0) -> ImageSource:
    """The `ImageSource` for ``"sample"`` / ``"sample:N"`` (label_key None for every crop)."""
    n = bundled.parse_count(spec)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise DataError(f"seed must be an integer, not {seed!r}")
    photos = bundled.available_photos()
    if not photos:
        raise DataError(f"none of the bundled sample photos were found in {bundled.sample_dir()}")
    items = [
        ImageItem(i, f"{SAMPLE_PREFIX}{name}#{x0},{y0},{x1},{y1}", None)
        for i, (name, (x0, y0, x1, y1)) in enumerate(bundled.crop_boxes(n, int(seed), photos))
    ]
    return ImageSource(
        items,
        f"bundled sample crops (scikit-image photos, seed {int(seed)})",
        fingerprint_salt=f"sample seed={int(seed)} photos={','.join(photos)}",
        stat_files=False,
    )
