"""Image sources: folders, lists of paths and the bundled sample photos (see `sources`)."""

from .sources import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    ImageItem,
    ImageSource,
    images,
    load_rgb,
    to_rgb,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageDecodeError",
    "ImageItem",
    "ImageSource",
    "images",
    "load_rgb",
    "to_rgb",
]
