"""The bundled sample: random crops of the real photographs shipped with scikit-image.

``images("sample:N")`` gives N square crops, so the whole pipeline can run without any dataset.
The photos are the files in scikit-image's ``skimage/data`` folder that are real photographs
(no synthetic test patterns, text pages, logos or phantoms):

* colour: astronaut, chelsea (a cat), coffee, rocket, motorcycle_left, hubble_deep_field,
  retina, ihc (immunohistochemistry micrograph);
* greyscale (converted to RGB grey): camera, brick, grass, gravel, coins, moon.

Each crop picks a photo at random, colour photos with twice the weight of greyscale ones (so
about three crops in four are in colour), then a side uniformly in 20%..100% of that photo's
short side and a uniformly random position. All draws come from ``numpy.random.default_rng(seed)``,
so a (seed, N) pair always gives the same crops; the crop is recorded in the item's path as
``"sample:<photo file>#x0,y0,x1,y1"`` (PIL box: x1, y1 exclusive), which `load_crop` (and so
`actatlas.data.load_rgb`) can decode again later without the source object.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re

import numpy as np
from PIL import Image

from ..errors import DataError, UserError
from .decode import SAMPLE_PREFIX, ImageDecodeError, load_file

DEFAULT_COUNT = 512

COLOUR_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
)
GREY_PHOTOS = ("camera.png", "brick.png", "grass.png", "gravel.png", "coins.png", "moon.png")
SAMPLE_PHOTOS = COLOUR_PHOTOS + GREY_PHOTOS
"""Photo file names, in the fixed order the random draws index into."""

MIN_FRACTION, MAX_FRACTION = 0.2, 1.0

_PATH_RE = re.compile(r"^sample:([A-Za-z0-9_.\-]+)#(-?\d+),(-?\d+),(-?\d+),(-?\d+)$")


def sample_dir() -> str:
    """The folder of scikit-image's bundled data files (found without importing skimage.data)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the bundled sample needs scikit-image (pip install scikit-image)")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def available_photos() -> list[str]:
    """`SAMPLE_PHOTOS` present in the installed scikit-image, in `SAMPLE_PHOTOS` order."""
    folder = sample_dir()
    return [name for name in SAMPLE_PHOTOS if os.path.isfile(os.path.join(folder, name))]


@functools.lru_cache(maxsize=None)
def _photo_size(name: str) -> tuple[int, int]:
    path = os.path.join(sample_dir(), name)
    try:
        with Image.open(path) as im:  # reads the header only
            return im.size
    except OSError as e:
        raise DataError(f"bundled photo {path} is unreadable: {e}") from e


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> Image.Image:
    """A decoded bundled photo as RGB (cached: 14 photos, about 20 MB in all)."""
    return load_file(os.path.join(sample_dir(), name))


def parse_count(spec: str) -> int:
    """``"sample"`` -> `DEFAULT_COUNT`; ``"sample:N"`` -> N (a positive integer) else UserError."""
    if spec == "sample":
        return DEFAULT_COUNT
    text = spec[len(SAMPLE_PREFIX):].strip()
    if not text.isdigit() or int(text) <= 0:
        raise DataError(f"bad bundled sample {spec!r}: use 'sample' or 'sample:N' with N a positive integer")
    return int(text)


def crop_boxes(n: int, seed: int, photos: list[str]) -> list[tuple[str, tuple[int, int, int, int]]]:
    """The n (photo, box) pairs drawn for `seed` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    weights = np.array([2.0 if p in COLOUR_PHOTOS else 1.0 for p in photos])
    weights /= weights.sum()
    out = []
    for _ in range(n):
        name = photos[int(rng.choice(len(photos), p=weights))]
        w, h = _photo_size(name)
        short = min(w, h)
        side = int(round(rng.uniform(MIN_FRACTION, MAX_FRACTION) * short))
        side = min(max(side, 1), short)
        x0 = int(rng.integers(0, w - side + 1))
        y0 = int(rng.integers(0, h - side + 1))
        out.append((name, (x0, y0, x0 + side, y0 + side)))
    return out


def load_crop(path: str) -> Image.Image:
    """Decode ``"sample:<photo>#x0,y0,x1,y1"`` into an RGB crop; ImageDecodeError if malformed."""
    m = _PATH_RE.match(path)
    if m is None:
        raise ImageDecodeError(path, "not a bundled-sample path ('sample:<photo>#x0,y0,x1,y1')")
    name = m.group(1)
    if name not in SAMPLE_PHOTOS:
        raise ImageDecodeError(path, f"unknown bundled photo {name!r}")
    x0, y0, x1, y1 = (int(m.group(k)) for k in range(2, 6))
    try:
        photo = _photo(name)
    except UserError as e:  # skimage missing
        raise ImageDecodeError(path, str(e)) from e
    w, h = photo.size
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ImageDecodeError(path, f"crop box outside the {w}x{h} photo")
    return photo.crop((x0, y0, x1, y1))
