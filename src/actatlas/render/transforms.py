"""Transformation robustness for feature visualization (method.md §1.11).

Every transform is an ``nn.Module`` called as ``t(x, generator)`` on images x [b, c, h, w] and returns
[b, c, h', w']. Random choices come only from the ``torch.Generator`` passed in (a CPU generator; the
global RNG is never used), so a seeded generator reproduces the draws exactly.

By default ONE draw per call is shared by the whole batch, as Lucid does (§1.11; `tf.random_crop` on
the batch tensor, one scale, one angle). ``per_sample=True`` draws separately for every image.

Every transform also reports the set of output sizes it can produce (`output_sizes`), so a chain has a
small, known set of network input shapes that can be warmed up once (performance.md pitfalls: a fixed
set of scales, never continuous random sizes).

Chains:
- `recipe_transforms(size)`: [RECIPE] pad 16 (0.5) -> jitter 4,4,8,8,8 -> scale {0.998^n, n=20..39}
  -> rotate (75 angles) -> jitter 2 -> crop_or_pad_to(size). 80 px in -> 80 px out, always.
- `notebook_transforms()`: [NB] pad 2 (1.0, white) -> jitter 4,4,8,8,8 -> scale (125 values,
  0.995^-5..0.995^79 and 2x 0.998^20..39) -> rotate (75 angles) -> jitter 2. 80 px in -> 32..51 px out.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Transform", "Pad", "Jitter", "RandomScale", "RandomRotate", "CropOrPadTo", "Compose",
    "RECIPE_SCALES", "NOTEBOOK_SCALES", "RECIPE_ANGLES", "recipe_transforms", "notebook_transforms",
    "make_transforms",
]

Size = tuple[int, int]

RECIPE_SCALES: tuple[float, ...] = tuple(0.998 ** n for n in range(20, 40))
"""[RECIPE] random_scale set: 20 values, 0.9608 .. 0.9249 (method.md §1.11)."""

NOTEBOOK_SCALES: tuple[float, ...] = (tuple(0.995 ** n for n in range(-5, 80))
                                      + tuple(0.998 ** n for n in 2 * list(range(20, 40))))
"""[NB] random_scale list: 125 entries (duplicates weight the draw), 1.0254 .. 0.6730 (§1.11)."""

RECIPE_ANGLES: tuple[int, ...] = tuple(itertools.chain(range(-20, 20), range(-10, 10), range(-5, 5), 5 * [0]))
"""Rotation multiset in degrees, 75 entries: small angles are over-weighted (§1.11)."""


def _draw(n: int, count: int, generator: torch.Generator | None) -> list[int]:
    """`count` uniform indices in [0, n) from `generator` (required: no global RNG)."""
    if generator is None:
        raise ValueError("random transforms need a torch.Generator (seeded); got None")
    return torch.randint(0, n, (count,), generator=generator).tolist()


class Transform(nn.Module):
    """Base class: ``forward(x [b, c, h, w], generator) -> [b, c, h', w']`` and
    ``output_sizes(size) -> set of (h', w')`` for an input of spatial size `size` = (h, w)."""

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def output_sizes(self, size: Size) -> set[Size]:
        return {tuple(size)}


class Pad(Transform):
    """Constant padding by `n` px on every side: [b, c, h, w] -> [b, c, h+2n, w+2n]."""

    def __init__(self, n: int, value: float = 0.5):
        super().__init__()
        self.n, self.value = int(n), float(value)

    def forward(self, x, generator=None):
        n = self.n
        return F.pad(x, (n, n, n, n), mode="constant", value=self.value)

    def output_sizes(self, size):
        return {(size[0] + 2 * self.n, size[1] + 2 * self.n)}

    def extra_repr(self):
        return f"n={self.n}, value={self.value}"


class Jitter(Transform):
    """Random crop to (h-d, w-d): offsets uniform in 0..d (inclusive), as ``tf.image.random_crop``."""

    def __init__(self, d: int, per_sample: bool = False):
        super().__init__()
        self.d, self.per_sample = int(d), bool(per_sample)

    def forward(self, x, generator=None):
        d = self.d
        if d == 0:
            return x
        b, _, h, w = x.shape
        nh, nw = h - d, w - d
        if self.per_sample:
            offs = _draw(d + 1, 2 * b, generator)
            return torch.stack([x[i, :, offs[2 * i]:offs[2 * i] + nh, offs[2 * i + 1]:offs[2 * i + 1] + nw]
                                for i in range(b)])
        oy, ox = _draw(d + 1, 2, generator)
        return x[:, :, oy:oy + nh, ox:ox + nw]

    def output_sizes(self, size):
        return {(size[0] - self.d, size[1] - self.d)}

    def extra_repr(self):
        return f"d={self.d}, per_sample={self.per_sample}"


def _scaled(n: int, s: float) -> int:
    """int(s * n) computed in float32, as Lucid's ``tf.cast(scale * tf.cast(shape, float32), int32)``."""
    return int(np.float32(s) * np.float32(n))


def _center_crop_or_pad(x: torch.Tensor, th: int, tw: int, value: float = 0.0) -> torch.Tensor:
    """Centre crop or constant-pad [b, c, h, w] to [b, c, th, tw] (offsets as TF's
    ``resize_image_with_crop_or_pad``: (h - th) // 2 cropped from the top, (th - h) // 2 padded there)."""
    h, w = x.shape[-2:]
    if h > th:
        top = (h - th) // 2
        x = x[..., top:top + th, :]
    if w > tw:
        left = (w - tw) // 2
        x = x[..., :, left:left + tw]
    h, w = x.shape[-2:]
    if h < th or w < tw:
        top, left = (th - h) // 2, (tw - w) // 2
        x = F.pad(x, (left, tw - w - left, top, th - h - top), mode="constant", value=value)
    return x


class RandomScale(Transform):
    """Resize by a scale drawn uniformly from the list `scales` (bilinear, ``align_corners=False``):
    [b, c, h, w] -> [b, c, int(s*h), int(s*w)].

    TF1's ``resize_bilinear`` used the older asymmetric sampling (no half-pixel centres); PyTorch's
    half-pixel bilinear differs by a sub-pixel shift, immaterial under jitter.

    ``per_sample=True``: each image gets its own scale, then is zero-padded (centred) to the size of the
    largest scale in the list, so the batch keeps one shape.
    """

    def __init__(self, scales: Iterable[float], per_sample: bool = False, mode: str = "bilinear"):
        super().__init__()
        self.scales = tuple(float(s) for s in scales)
        if not self.scales:
            raise ValueError("RandomScale needs at least one scale")
        self.per_sample, self.mode = bool(per_sample), mode

    def _resize(self, x, s):
        h, w = x.shape[-2:]
        size = (_scaled(h, s), _scaled(w, s))
        if size == (h, w):
            return x
        return F.interpolate(x, size=size, mode=self.mode, align_corners=False)

    def forward(self, x, generator=None):
        if not self.per_sample:
            (i,) = _draw(len(self.scales), 1, generator)
            return self._resize(x, self.scales[i])
        idx = _draw(len(self.scales), x.shape[0], generator)
        h, w = x.shape[-2:]
        th, tw = _scaled(h, max(self.scales)), _scaled(w, max(self.scales))
        return torch.cat([_center_crop_or_pad(self._resize(x[k:k + 1], self.scales[i]), th, tw)
                          for k, i in enumerate(idx)])

    def output_sizes(self, size):
        if self.per_sample:
            s = max(self.scales)
            return {(_scaled(size[0], s), _scaled(size[1], s))}
        return {(_scaled(size[0], s), _scaled(size[1], s)) for s in self.scales}

    def extra_repr(self):
        return (f"{len(self.scales)} scales in [{min(self.scales):.4f}, {max(self.scales):.4f}], "
                f"per_sample={self.per_sample}")


class RandomRotate(Transform):
    """Rotate about the image centre by an angle (degrees) drawn uniformly from the list `angles`;
    uncovered corners are filled with zeros (black), as ``tfa.image.rotate``. Output size = input size.

    Implemented with ``affine_grid`` + ``grid_sample`` (``align_corners=False``). Positive angles turn
    the content counter-clockwise as displayed (rows downward). `mode` "nearest" is the reference's
    interpolation (its gradient still reaches the input pixels that are sampled); "bilinear" is
    smoother. Degrees become radians with π ≈ `pi` = 3.14, as Lucid's ``_angle2rads``.
    """

    def __init__(self, angles: Iterable[float], per_sample: bool = False, mode: str = "nearest",
                 pi: float = 3.14):
        super().__init__()
        self.angles = tuple(float(a) for a in angles)
        if not self.angles:
            raise ValueError("RandomRotate needs at least one angle")
        if mode not in ("nearest", "bilinear"):
            raise ValueError(f"mode must be 'nearest' or 'bilinear', not {mode!r}")
        self.per_sample, self.mode, self.pi = bool(per_sample), mode, float(pi)

    def rotate(self, x: torch.Tensor, degrees: Sequence[float]) -> torch.Tensor:
        """Rotate image k of x [b, c, h, w] by ``degrees[k]`` (len b, or 1 for the whole batch)."""
        b, _, h, w = x.shape
        rad = torch.tensor([self.pi * a / 180.0 for a in degrees], dtype=torch.float64)
        cos, sin = torch.cos(rad), torch.sin(rad)
        # output -> input sampling in normalised coordinates, with the aspect ratio of pixel space
        theta = torch.zeros(len(degrees), 2, 3, dtype=torch.float64)
        theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * h / w
        theta[:, 1, 0], theta[:, 1, 1] = sin * w / h, cos
        theta = theta.to(device=x.device, dtype=x.dtype).expand(b, 2, 3)
        grid = F.affine_grid(theta, [b, x.shape[1], h, w], align_corners=False)
        return F.grid_sample(x, grid, mode=self.mode, padding_mode="zeros", align_corners=False)

    def forward(self, x, generator=None):
        if self.per_sample:
            idx = _draw(len(self.angles), x.shape[0], generator)
            degs = [self.angles[i] for i in idx]
            return x if not any(degs) else self.rotate(x, degs)
        (i,) = _draw(len(self.angles), 1, generator)
        return x if self.angles[i] == 0 else self.rotate(x, [self.angles[i]])

    def extra_repr(self):
        return f"{len(self.angles)} angles, mode={self.mode!r}, per_sample={self.per_sample}"


class CropOrPadTo(Transform):
    """Centre crop or zero-pad (black) to `size` x `size` (or (h, w)), as ``crop_or_pad_to``."""

    def __init__(self, size: int | Size, value: float = 0.0):
        super().__init__()
        self.size = (int(size), int(size)) if isinstance(size, (int, np.integer)) else tuple(map(int, size))
        self.value = float(value)

    def forward(self, x, generator=None):
        return _center_crop_or_pad(x, self.size[0], self.size[1], self.value)

    def output_sizes(self, size):
        return {self.size}

    def extra_repr(self):
        return f"size={self.size}"


class Compose(Transform):
    """Apply transforms in order; all draw from the same generator."""

    def __init__(self, transforms: Iterable[Transform] = ()):
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x, generator=None):
        for t in self.transforms:
            x = t(x, generator)
        return x

    def output_sizes(self, size):
        sizes = {tuple(size)}
        for t in self.transforms:
            sizes = set().union(*(t.output_sizes(s) for s in sizes))
        return sizes


def recipe_transforms(size: int, per_sample: bool = False, rotate_mode: str = "nearest") -> Compose:
    """[RECIPE] chain ("holy mother of transforms", method.md §1.11); `size` px in -> `size` px out."""
    return Compose([
        Pad(16, 0.5),
        *(Jitter(d, per_sample) for d in (4, 4, 8, 8, 8)),
        RandomScale(RECIPE_SCALES, per_sample),
        RandomRotate(RECIPE_ANGLES, per_sample, mode=rotate_mode),
        Jitter(2, per_sample),
        CropOrPadTo(size),
    ])


def notebook_transforms(per_sample: bool = False, rotate_mode: str = "nearest") -> Compose:
    """[NB] chain (method.md §1.11): no final crop, so an 80 px icon reaches the network at 32..51 px."""
    return Compose([
        Pad(2, 1.0),
        *(Jitter(d, per_sample) for d in (4, 4, 8, 8, 8)),
        RandomScale(NOTEBOOK_SCALES, per_sample),
        RandomRotate(RECIPE_ANGLES, per_sample, mode=rotate_mode),
        Jitter(2, per_sample),
    ])


def make_transforms(name: str, size: int, per_sample: bool = False) -> Compose:
    """``"recipe"`` | ``"notebook"`` | ``"none"`` (identity) -> a `Compose`."""
    if name == "recipe":
        return recipe_transforms(size, per_sample)
    if name == "notebook":
        return notebook_transforms(per_sample)
    if name == "none":
        return Compose([])
    raise ValueError(f"transforms must be 'recipe', 'notebook' or 'none', not {name!r}")

