"""ModelSpec: a model plus everything needed to feed it and read it.

Preprocessing, class names and layer aliases are metadata here, so no code anywhere branches on a
model's class name (design.md).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import ModelError, UserError

_INTERP = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}


@dataclass(frozen=True)
class Preprocess:
    """How a PIL image becomes the model's input tensor.

    Geometry (`to_unit`): ``mode="resize_crop"`` resizes the short side to `resize` and centre-crops
    `size` x `size` (the ImageNet evaluation rule); ``mode="squash"`` resizes the whole image to
    `size` x `size` without keeping the aspect ratio (the article's collection rule, method.md §1.1).

    Values (`normalize`): the model sees ``(255 * x - mean) / std`` per channel, for x in [0, 1].
    EfficientNet-Lite: mean 127, std 128. Lucid InceptionV1: mean 117, std 1 (range [-117, 138]).
    """

    size: int = 224
    resize: int | None = 256
    mode: str = "resize_crop"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)

    def __post_init__(self):
        if self.mode not in ("resize_crop", "squash"):
            raise ValueError(f"Preprocess.mode must be 'resize_crop' or 'squash', not {self.mode!r}")
        if self.interpolation not in _INTERP:
            raise ValueError(f"Preprocess.interpolation must be one of {sorted(_INTERP)}")

    def geometry(self, img: Image.Image) -> Image.Image:
        """Resize/crop an RGB PIL image to `size` x `size` (still a PIL image)."""
        interp = _INTERP[self.interpolation]
        if self.mode == "squash":
            return img.resize((self.size, self.size), interp)
        short = self.resize or self.size
        w, h = img.size
        if w <= h:
            nw, nh = short, max(1, round(h * short / w))
        else:
            nw, nh = max(1, round(w * short / h)), short
        left = (nw - self.size) // 2
        top = (nh - self.size) // 2
        if (nw, nh) != (w, h) and left >= 0 and top >= 0:
            # resize only the part of the image that becomes the crop: the same filter centres and
            # supports as resizing the whole image to (nw, nh) and cropping (PIL reads pixels beyond
            # the box for the filter), at ~60% of the cost; equal up to 8-bit rounding between the
            # two passes (mean 0.02 grey levels over the ImageNet sample, 0.3 on its worst photo)
            sx, sy = w / nw, h / nh
            box = (left * sx, top * sy, (left + self.size) * sx, (top + self.size) * sy)
            return img.resize((self.size, self.size), interp, box=box)
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), interp)
        if left < 0 or top < 0:  # resize smaller than crop: pad by resizing up instead
            img = img.resize((max(nw, self.size), max(nh, self.size)), interp)
            left, top = max(left, 0), max(top, 0)
        return img.crop((left, top, left + self.size, top + self.size))

    DECODE_MARGIN = 2
    """`decode_side` is this many times the resize target (see there)."""

    @property
    def target_side(self) -> int:
        """The short side `geometry` resizes every image to before cropping (``squash``: `size`)."""
        if self.mode == "squash":
            return int(self.size)
        return int(max(self.resize or self.size, self.size))

    @property
    def decode_side(self) -> int:
        """The smallest short side a loader should decode an image at (``min_side`` of
        `actatlas.data.load_rgb`, which then decodes large JPEGs directly at 1/2, 1/4 or 1/8 scale).

        `DECODE_MARGIN` x `target_side`, never below the target: `geometry` itself then still
        downscales by at least 2x with its own antialiasing filter, so the model input stays within
        about one grey level of a full-size decode on average (at the bare target, libjpeg's DCT
        downscale would set the high frequencies instead; up to ~11 grey levels on textured photos).
        """
        return self.DECODE_MARGIN * self.target_side

    def to_uint8(self, img: Image.Image) -> np.ndarray:
        """RGB PIL image -> uint8 array [3, size, size] (geometry applied)."""
        arr = np.asarray(self.geometry(img), dtype=np.uint8)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[b, 3, h, w] in [0, 1] (float) or uint8 in [0, 255] -> the model's input scale."""
        if x.dtype == torch.uint8:
            x = x.float()
        else:
            x = x * 255.0
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ModelSpec:
    """A classifier and its metadata.

    Attributes:
        name: registry name (e.g. ``"efficientnet_lite0"``).
        module: ``nn.Module`` in eval mode; ``module(x)`` maps the normalized input [b, 3, s, s] to
            logits [b, num_classes].
        preprocess: input geometry and value scaling.
        class_names: one name per logit (len == num_classes).
        wnids: ImageNet WordNet ids per logit, or None when unknown.
        layers: alias -> dotted module name (e.g. ``{"mixed4c": "mixed4c"}``); dotted names from
            ``named_modules()`` are always accepted too.
        default_layer: the mid-level layer used when ``--layers`` is omitted (as the article's mixed4c).
        info: free-form provenance (weights file, sha256, ...), written into run manifests.
    """

    name: str
    module: nn.Module
    preprocess: Preprocess
    class_names: list[str]
    default_layer: str
    wnids: list[str] | None = None
    layers: dict[str, str] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_size(self) -> int:
        return self.preprocess.size

    @cached_property
    def _module_names(self) -> list[str]:
        return [n for n, _ in self.module.named_modules() if n]

    def resolve_layer(self, name: str) -> str:
        """Alias or dotted name -> dotted module name; UserError listing valid names otherwise."""
        if name in self.layers:
            return self.layers[name]
        if name in self._module_names:
            return name
        aliases = ", ".join(self.layers) if self.layers else "(none)"
        raise ModelError(
            f"unknown layer {name!r} for model {self.name!r}. Aliases: {aliases}. "
            f"Run 'actatlas layers {self.name}' for every hookable layer."
        )

    def layer_label(self, module_name: str) -> str:
        """The alias of a dotted module name if it has one (for display), else the name."""
        for alias, target in self.layers.items():
            if target == module_name:
                return alias
        return module_name

    def class_index(self, key: str | int) -> int:
        """Resolve a class given by index, wnid or name (case-insensitive; spaces or underscores), e.g.
        ``"scuba diver"``, ``"scuba_diver"`` or ``"n10565667"``.

        Raises ModelError with "did you mean" suggestions for near misses or ambiguous names.
        """
        return resolve_class(key, self.class_names, self.wnids)

    def to_device(self, device: str | torch.device) -> "ModelSpec":
        self.module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        """Where the module's parameters are (cpu for a module without parameters)."""
        p = next(iter(self.module.parameters()), None)
        return p.device if p is not None else torch.device("cpu")


def resolve_class(key: str | int, names: Sequence[str], wnids: Sequence[str] | None = None) -> int:
    """See `ModelSpec.class_index`.

    Raises:
        ModelError: an index out of range, an unknown name (with "did you mean" suggestions) or a name
            that several logits carry (the message lists their indices and wnids).
    """
    import difflib

    n = len(names)
    if isinstance(key, (int, np.integer)) or (isinstance(key, str) and key.strip().lstrip("-").isdigit()):
        idx = int(key)
        if not 0 <= idx < n:
            raise ModelError(f"class index {idx} out of range [0, {n})")
        return idx
    text = str(key).strip()
    if wnids is not None and text:
        if text in wnids:
            return list(wnids).index(text)
        if re.fullmatch(r"[nN]\d{8}", text):  # a wnid with a capital N
            hits = [i for i, w in enumerate(wnids) if w.lower() == text.lower()]
            if hits:
                return hits[0]
    norm = lambda s: " ".join(s.lower().replace("_", " ").split())  # noqa: E731
    matches = [i for i, nm in enumerate(names) if norm(nm) == norm(text)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        options = ", ".join(f"{i}" + (f" ({wnids[i]})" if wnids and wnids[i] else "") for i in matches)
        raise ModelError(f"class name {text!r} is ambiguous: use an index or wnid: {options}")
    close = difflib.get_close_matches(norm(text), [norm(s) for s in names], n=5, cutoff=0.6)
    hint = f"; did you mean: {', '.join(close)}?" if close else ""
    raise ModelError(f"unknown class {text!r}{hint}")


def imagenet_classes() -> tuple[list[str], list[str]]:
    """The 1000 ILSVRC-2012 classes in standard (sorted-wnid) order: (names, wnids)."""
    text = resources.files("actatlas.resources").joinpath("imagenet_classes.tsv").read_text("utf-8")
    names, wnids = [], []
    for line in text.splitlines():
        if not line.strip():
            continue
        _, wnid, name = line.split("\t")
        wnids.append(wnid)
        names.append(name)
    assert len(names) == 1000
    return names, wnids


ModelFactory = Callable[..., ModelSpec]
