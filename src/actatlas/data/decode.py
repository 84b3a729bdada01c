"""Decoding one image file into RGB: the error type, the pixel cap, reduced-scale JPEG decoding and the
conversion of every PIL mode to 8-bit RGB. Below both `sources` (listings) and `bundled` (sample crops).

Every decoding problem surfaces as `ImageDecodeError` (never a bare PIL exception), so a collector
can skip the bad file and go on.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ConfigError

SAMPLE_PREFIX = "sample:"

_DECODE_ERRORS = (
    OSError,  # includes UnidentifiedImageError, truncated files, FileNotFoundError
    SyntaxError,  # some plugins report malformed headers this way
    ValueError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
    UnidentifiedImageError,
)


@dataclass(frozen=True)
class ImageItem:
    """One image of a source.

    Attributes:
        index: the item's position in the listing it came from (0..len-1). ``head(n)`` and
            ``source[:n]`` keep these positions; other slices keep the items unchanged, so
            ``index`` always identifies the image within the full listing.
        path: absolute file path, or ``"sample:<photo name>#x0,y0,x1,y1"`` for a bundled crop.
        label_key: a wnid (``n01440764``) or a class name (a class-folder name or a label from a
            list file); None when unknown.
    """

    index: int
    path: str
    label_key: str | None = None


class ImageDecodeError(Exception):
    """A file that cannot be decoded as an image (corrupt, truncated, missing or not an image)."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


# --------------------------------------------------------------------------------------------
# Decoding


DEFAULT_MAX_PIXELS = 50_000_000
"""Default pixel cap (width x height, 50 megapixels) of `load_rgb` and `images`: a larger file is
refused from its header, before anything is decoded (a 13000 x 13000 PNG of 0.5 MB would take
1.75 GB decoded). Camera photos (12-48 MP) pass."""


def check_max_pixels(max_pixels) -> int | None:
    """Validate a pixel cap: a positive int, or None (or 0) for no cap of our own; UserError otherwise."""
    if max_pixels is None:
        return None
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)):
        raise ConfigError(f"max_pixels must be a positive integer or None, not {max_pixels!r}")
    if max_pixels < 0:
        raise ConfigError(f"max_pixels must be >= 1 (or 0 for no cap), got {max_pixels}")
    return int(max_pixels) or None


def _megapixels(n: int) -> str:
    return f"{n / 1e6:.3g} MP"


def load_file(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
              min_side: int | None = None) -> Image.Image:
    """Decode an image file into an RGB (8 bits per channel) PIL image.

    EXIF orientation is applied. Truncated files raise (``ImageFile.LOAD_TRUNCATED_IMAGES`` is
    left as PIL's default, False). Animated/multi-page files give their first frame. Mode
    conversions are described in `to_rgb`. (`actatlas.data.load_rgb` also takes bundled-sample paths.)

    Args:
        max_pixels: refuse (`ImageDecodeError`) an image whose header says it has more than this
            many pixels (width x height), before decoding it. None or 0: no cap of ours (PIL's own
            decompression-bomb limit, ``2 * Image.MAX_IMAGE_PIXELS``, still applies).
        min_side: the short side the caller needs (e.g. the model's resize target). A JPEG larger
            than that is decoded directly at a reduced scale (1/2, 1/4 or 1/8, libjpeg's DCT
            scaling, ``Image.draft``) whose short side is still >= `min_side`, which is much faster
            and bounds memory for camera photos. Other formats, and None, decode at full size.

    Raises:
        ImageDecodeError: the file is missing, unreadable, not an image, corrupt, truncated, or over
            `max_pixels`.
    """
    text = os.fspath(path)
    try:
        with Image.open(text) as im:
            w, h = im.size  # from the header; nothing is decoded yet
            if max_pixels and w * h > max_pixels:
                raise ImageDecodeError(
                    text, f"image is {w}x{h} pixels ({_megapixels(w * h)}), over the limit of "
                          f"{_megapixels(max_pixels)} (max_pixels={max_pixels}); raise max_pixels")
            if min_side and im.format == "JPEG":
                _draft(im, int(min_side))
            im.load()
            transposed = ImageOps.exif_transpose(im)
            return to_rgb(transposed if transposed is not None else im)
    except _DECODE_ERRORS as e:
        reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise ImageDecodeError(text, reason) from e


def _draft(im: Image.Image, min_side: int) -> None:
    """Ask the JPEG decoder for the smallest DCT scale whose short side is still >= `min_side`."""
    w, h = im.size
    short = min(w, h)
    if short < 2 * min_side:  # no 1/2 scale would keep min_side
        return
    # PIL picks the largest scale s in (8, 4, 2, 1) with s <= min(w // rw, h // rh); asking for a
    # size of the image's aspect whose short side is min_side keeps the result's short side
    # ceil(short / s) >= short / (short // min_side) >= min_side.
    im.draft("RGB", (max(1, -(-w * min_side // short)), max(1, -(-h * min_side // short))))


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert a loaded PIL image of any mode to mode ``"RGB"``.

    Rules:

    * RGB: unchanged.
    * Transparency (LA, La, PA, RGBA, RGBa, P/L/RGB with a ``transparency`` entry): composited over
      a white background, so fully transparent pixels become white.
    * L, 1, P, CMYK, YCbCr and other 8-bit modes: PIL's own conversion.
    * Integer modes wider than 8 bits (I, I;16, I;16B, I;16L, ...), scaled by the image's actual
      maximum: if all values lie in 0..255 they are kept (8-bit data in a wide container); if the
      maximum is at most 65535 the image is taken as 16-bit and divided by 257 (so 65535 -> 255);
      larger maxima are scaled linearly so the maximum becomes 255. Negative values clip to 0.
    * F (float): values within [0, 1] are multiplied by 255; otherwise the integer rule above is
      applied. NaN becomes 0, +inf the maximum finite value.

    The result is grey replicated to three channels for single-channel inputs.
    """
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in ("LA", "La", "PA", "RGBA", "RGBa") or (
        "transparency" in im.info and mode in ("P", "L", "RGB")
    ):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    if mode == "F" or mode == "I" or mode.startswith("I;"):
        return _wide_to_rgb(im)
    return im.convert("RGB")


def _wide_to_rgb(im: Image.Image) -> Image.Image:
    """Scale a single-channel 16/32-bit integer or float image to RGB uint8 (see `to_rgb`)."""
    arr = np.asarray(im)
    if arr.ndim != 2:  # pragma: no cover - PIL's wide modes are single-channel
        raise ValueError(f"unexpected array shape {arr.shape} for mode {im.mode}")
    data = arr.astype(np.float64)
    if im.mode == "F":
        finite = np.isfinite(data)
        top = float(data[finite].max()) if finite.any() else 0.0
        data = np.nan_to_num(data, nan=0.0, posinf=top, neginf=0.0)
        lo = float(data.min()) if data.size else 0.0
        if lo >= 0.0 and top <= 1.0:
            data = data * 255.0
        else:
            data = _scale_by_max(data, top)
    else:
        top = float(data.max()) if data.size else 0.0
        data = _scale_by_max(data, top)
    grey = np.clip(np.rint(data), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), mode="RGB")


def _scale_by_max(data: np.ndarray, top: float) -> np.ndarray:
    if top <= 255.0:
        return data
    if top <= 65535.0:
        return data / 257.0
    return data * (255.0 / top)


# --------------------------------------------------------------------------------------------
# The source
