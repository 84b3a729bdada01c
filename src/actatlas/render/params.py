"""Image parameterization for feature visualization (method.md §1.10).

An icon is not optimised pixel by pixel. Its pixels are a fixed, differentiable function of a Fourier
spectrum (Lucid's ``param.image(size, fft=True, decorrelate=True)``):

1. spectrum ``real + i*imag``, each [b, c, h, w//2+1], initialised N(0, sd=0.01);
2. multiplied by ``spectrum_scale(h, w)`` = sqrt(h*w) / max(f, 1/max(h, w)), f = the radial frequency
   from ``fftfreq`` (so every frequency starts with roughly equal energy in the image);
3. inverse real 2-D FFT (``norm="backward"``: divides by h*w, as TF's ``irfft2d``), divided by 4;
4. colour decorrelation: rgb = C_n @ t per pixel, C_n = ``color_correlation_matrix()`` (§1.10);
5. sigmoid, so the image lies in (0, 1).

A zero spectrum gives exactly 0.5 everywhere (irfft of 0 is 0; sigmoid(0) = 0.5).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["FFTImage", "spectrum_scale", "color_correlation_matrix", "collapse_alpha", "COLOR_CORRELATION"]

COLOR_CORRELATION = (
    (0.26, 0.09, 0.02),
    (0.27, 0.00, -0.05),
    (0.27, -0.09, 0.03),
)
"""Lucid's ImageNet colour-correlation square root (``color.py``), rows = R, G, B (method.md §1.10)."""


def color_correlation_matrix(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """C / max column L2 norm, [3, 3] (the max column norm is ~0.4620, so the result's is exactly 1)."""
    c = torch.tensor(COLOR_CORRELATION, dtype=torch.float64)
    max_norm = c.norm(dim=0).max()
    return (c / max_norm).to(dtype)


def spectrum_scale(h: int, w: int, decay_power: float = 1.0) -> torch.Tensor:
    """Per-frequency scale [h, w//2+1]: ``sqrt(h*w) / max(f, 1/max(h, w))**decay_power``.

    f = sqrt(fy^2 + fx^2) with fy = ``fftfreq(h)`` (rows) and fx the first w//2+1 entries of
    ``fftfreq(w)`` in absolute value (= ``rfftfreq(w)``), as Lucid's ``rfft2d_freqs`` (method.md §1.10).
    Computed in float64 and returned as float32.
    """
    fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(w, dtype=torch.float64)[None, :]
    freqs = torch.sqrt(fx * fx + fy * fy)
    floor = 1.0 / max(h, w)
    scale = math.sqrt(h * w) / torch.clamp(freqs, min=floor) ** decay_power
    return scale.to(torch.float32)


class FFTImage(nn.Module):
    """A batch of images parameterized by a scaled, colour-decorrelated Fourier spectrum (§1.10).

    Args:
        batch: number of images b (one icon each).
        h, w: image size in pixels.
        channels: colour channels (3); the alpha channel, if any, comes on top.
        sd: standard deviation of the N(0, sd) initial spectrum (Lucid: 0.01).
        decorrelate: apply the colour decorrelation matrix (needs channels == 3).
        alpha: add a 4th (alpha) channel; it is sigmoid-squashed but not decorrelated.
        generator: the torch.Generator for the initial spectrum (global RNG untouched when given).

    Parameter:
        spectrum: [2, b, c', h, w//2+1] (real, imaginary), c' = channels + alpha.

    forward() -> [b, c', h, w] in (0, 1) (float32, on the parameter's device).
    """

    def __init__(self, batch: int, h: int, w: int, channels: int = 3, sd: float = 0.01,
                 decorrelate: bool = True, alpha: bool = False,
                 generator: torch.Generator | None = None, device: str | torch.device | None = None):
        super().__init__()
        if decorrelate and channels != 3:
            raise ValueError(f"colour decorrelation needs channels == 3, got {channels}")
        self.batch, self.h, self.w = int(batch), int(h), int(w)
        self.channels, self.alpha, self.decorrelate = int(channels), bool(alpha), bool(decorrelate)
        depth = self.channels + int(self.alpha)
        shape = (2, self.batch, depth, self.h, self.w // 2 + 1)
        # draw on the CPU (the generator's device), then move: the same seed gives the same image anywhere
        init = torch.randn(shape, generator=generator, dtype=torch.float32) * sd
        self.spectrum = nn.Parameter(init.to(device) if device is not None else init)
        self.register_buffer("scale", spectrum_scale(self.h, self.w), persistent=False)
        self.register_buffer("color", color_correlation_matrix(), persistent=False)
        if device is not None:
            self.to(device)

    def pre_sigmoid(self) -> torch.Tensor:
        """The image before the sigmoid, [b, c', h, w] (decorrelated when enabled)."""
        spec = torch.complex(self.spectrum[0], self.spectrum[1]) * self.scale
        t = torch.fft.irfft2(spec, s=(self.h, self.w), norm="backward") / 4.0
        if self.decorrelate:
            rgb = torch.einsum("ij,bjhw->bihw", self.color, t[:, :3])
            t = torch.cat([rgb, t[:, 3:]], dim=1) if self.alpha else rgb
        return t

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.pre_sigmoid())

    @torch.no_grad()
    def spectrum_of(self, images: torch.Tensor, eps: float = 0.5 / 255) -> torch.Tensor:
        """The spectrum [2, n, 3, h, w//2+1] whose image is `images` [n, 3, h, w] in [0, 1] (the exact
        inverse of `forward` for 3 decorrelated or plain channels, values clipped to [eps, 1 - eps] first,
        since the sigmoid never reaches 0 or 1). A start from a given image, e.g. a parent cell's icon."""
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (self.h, self.w):
            raise ValueError(f"images must be [n, 3, {self.h}, {self.w}], got {tuple(images.shape)}")
        x = images.to(self.scale.device, torch.float32).clamp(eps, 1 - eps)
        t = torch.log(x) - torch.log1p(-x)                      # logit
        if self.decorrelate:
            t = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(self.color), t)
        spec = torch.fft.rfft2(4.0 * t, s=(self.h, self.w), norm="backward") / self.scale
        return torch.stack([spec.real, spec.imag])

    def extra_repr(self) -> str:
        return (f"batch={self.batch}, h={self.h}, w={self.w}, channels={self.channels}, "
                f"alpha={self.alpha}, decorrelate={self.decorrelate}")


def collapse_alpha(img: torch.Tensor, k: float = 0.8, background: float = 0.0) -> torch.Tensor:
    """[b, 4, h, w] -> [b, 3, h, w]: ``rgb * ((1-k) + k*a) + background * k * (1-a)`` (the recipe's final
    compositing of an alpha icon, method.md §1.10). [b, 3, h, w] is returned unchanged."""
    if img.shape[1] == 3:
        return img
    rgb, a = img[:, :3], img[:, 3:4]
    return rgb * ((1 - k) + k * a) + background * k * (1 - a)
